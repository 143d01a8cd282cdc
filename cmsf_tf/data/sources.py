"""Where training and evaluation images come from.

A source gives every training example a stable dataset index 0..N-1, the same in every epoch and on
every worker, which banks, per-image pools, cluster ids and label splits are keyed by. Three kinds:

- `InMemorySource`: uint8 arrays (Fashion-MNIST, CIFAR-sized TFDS sets); index = position.
- `FileSource`: an ImageNet-style folder of encoded images read per example; index = position in the
  sorted (class, file name) list. Random access keeps the data order a pure function of (seed, epoch).
- `RecordSource`: sharded records read sequentially (our TFRecord schema, or a TFDS split too large for
  memory); the index travels inside each record (TFRecord) or is the position in TFDS's fixed file order.
"""

import concurrent.futures
import dataclasses
import gzip
import json
import os

import numpy as np

DEFAULT_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
DATASETS = ("fashion_mnist", "folder", "images", "tfrecord", "tfds:NAME[/CONFIG]")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# ImageNet-100: imagenet100 is the CMSF code's subset (util.subset_classes: seed 1234, first 100 of a
# permutation of the sorted class ids); imagenet100_cmc is CMC's list (Tian et al.), shared by 10 classes.
_HERE = os.path.dirname(os.path.abspath(__file__))
CLASS_LISTS = {"imagenet100": os.path.join(_HERE, "imagenet100.txt"),
               "imagenet100_cmc": os.path.join(_HERE, "imagenet100_cmc.txt")}
# Our TFRecord schema (written by tools/folder_to_tfrecord.py); see README "Data".
TFRECORD_INFO = "index.json"
# Beyond this many bytes of decoded training images a TFDS data set is not held in memory.
IN_MEMORY_LIMIT = 4 << 30


class DataError(Exception):
    """A problem with the user's data, reported as one sentence."""


@dataclasses.dataclass(frozen=True)
class InMemorySource:
    """A data set small enough to hold as uint8 arrays: images [N, H, W, C], labels [N]."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def num_train(self):
        return len(self.train_labels)

    @property
    def num_test(self):
        return len(self.test_labels)

    @property
    def image_shape(self):
        return self.train_images.shape[1:]

    @property
    def train_names(self):
        """Without file names, an example's name is its index ("0", "1", ...): a label-split file lists those."""
        return np.arange(self.num_train).astype(str)


@dataclasses.dataclass(frozen=True)
class FileSource:
    """Encoded images on disk (JPEG/PNG), decoded per example in the input pipeline."""

    name: str
    train_files: np.ndarray  # str [N], sorted by (class, file name)
    train_labels: np.ndarray
    test_files: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple
    skipped: tuple = ()  # (path, reason) of files left out as corrupt
    train_labelled: bool = True  # False: unlabelled training images (train_labels all -1)

    @property
    def num_train(self):
        return len(self.train_labels)

    @property
    def num_test(self):
        return len(self.test_labels)

    @property
    def train_names(self):
        return np.array([image_name(f) for f in self.train_files])


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """Sharded records read in sequence. `kind` "tfrecord": our schema, the index inside each record;
    "tfds": a TFDS split in its fixed file order, index = position. Labels and names are known up front
    for "tfrecord" (from index.json) and not for "tfds" (None)."""

    name: str
    kind: str
    train_files: tuple
    test_files: tuple
    num_train: int
    num_test: int
    num_classes: int
    train_labels: object = None  # int32 [N] or None
    train_names: object = None  # str [N] or None
    tfds_name: str = ""
    data_dir: str = ""
    test_split: str = ""


def image_name(path):
    """The key of an image in label-split files: its file name without directories and extension
    ("n01440764_10026"), as in the official 1% / 10% ImageNet lists."""
    base = str(path).strip().replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _tfds_name(dataset):
    """NAME[/CONFIG] of a "tfds:NAME[/CONFIG]" data set, else None."""
    prefix, _, name = dataset.partition(":")
    return name if prefix == "tfds" and name else None


def is_known(dataset):
    return dataset in ("fashion_mnist", "folder", "images", "tfrecord") or _tfds_name(dataset) is not None


def has_train_labels(source):
    """Whether the training images have labels (an unlabelled image folder's have none)."""
    return getattr(source, "train_labelled", True)


def knn_source(source):
    """The labelled source k-NN evaluation uses: `source` itself when its training images are labelled;
    for unlabelled training images with a labelled val/, val/ split in two (every other image of the
    sorted (class, file) list as the index, the rest as queries); None when nothing is labelled."""
    if has_train_labels(source):
        return source
    if not source.num_test:
        return None
    index, queries = slice(0, None, 2), slice(1, None, 2)
    return dataclasses.replace(
        source, name=f"{source.name}:val", train_files=source.test_files[index],
        train_labels=source.test_labels[index], test_files=source.test_files[queries],
        test_labels=source.test_labels[queries], train_labelled=True)


def no_labels_reason(source, dataset, what):
    """One sentence: why `what` (e.g. "k-NN evaluation") cannot run on an unlabelled source."""
    return (f"{what} needs labels, and {dataset}'s training images have none (no class folders)"
            + ("" if source.num_test else " and there is no labelled val/<class>/ folder"))


def load(dataset, data_dir="", class_list="", max_corrupt_fraction=0.001):
    if _tfds_name(dataset):
        return load_tfds(_tfds_name(dataset), data_dir)
    if dataset == "folder":
        return load_folder(data_dir, class_list, max_corrupt_fraction)
    if dataset == "images":
        return load_images(data_dir, max_corrupt_fraction)
    if dataset == "tfrecord":
        return load_tfrecord(data_dir)
    if dataset == "fashion_mnist":
        if not data_dir and not os.path.isdir(DEFAULT_DIRS["fashion_mnist"]):
            return download_fashion_mnist()
        return load_fashion_mnist(data_dir or DEFAULT_DIRS["fashion_mnist"])
    raise DataError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def load_fashion_mnist(data_dir):
    """Fashion-MNIST from its four IDX .gz files (Debian's dataset-fashion-mnist layout)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} does not exist")
    missing = [f for f in _FMNIST_FILES.values() if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise DataError(f"--data_dir {data_dir} does not hold Fashion-MNIST: missing {', '.join(missing)}")
    arrays = {key: read_idx(os.path.join(data_dir, f)) for key, f in _FMNIST_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataError(f"Fashion-MNIST {split} images and labels differ in count in {data_dir}")
    return InMemorySource(
        name="fashion_mnist",
        train_images=arrays["train_images"][..., None],
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=arrays["test_images"][..., None],
        test_labels=arrays["test_labels"].astype(np.int32),
        num_classes=10,
    )


def _tfds_builder(name, data_dir):
    import tensorflow_datasets as tfds

    if data_dir and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} does not exist")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # TFDS raises several types for unknown names and configs
        raise DataError(f"TFDS does not know the data set {name!r}: {str(e).splitlines()[0]}") from None
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image) or "label" not in features:
        raise DataError(f"tfds:{name} has no 'image' and 'label' features")
    return builder


def _tfds_eval_split(builder):
    splits = builder.info.splits
    for split in ("test", "validation"):
        if split in splits or not splits:  # no split info under tfds.testing.mock_data: try in order
            return split
    raise DataError(f"tfds:{builder.info.name} has neither a 'test' nor a 'validation' split")


def load_tfds(name, data_dir=""):
    """A TFDS data set: held in memory when its images have a fixed size and fit (CIFAR, STL-10, SVHN),
    streamed otherwise (imagenet2012, imagenet2012_subset/10pct, food101, ...)."""
    builder = _tfds_builder(name, data_dir)
    shape = builder.info.features["image"].shape
    num_train = builder.info.splits["train"].num_examples if "train" in builder.info.splits else 0
    if None in shape or num_train * int(np.prod(shape)) > IN_MEMORY_LIMIT:
        return _tfds_stream(name, builder, data_dir)
    return load_tfds_in_memory(name, data_dir)


def _tfds_stream(name, builder, data_dir):
    splits = builder.info.splits
    test_split = _tfds_eval_split(builder)
    if "train" in splits:
        num_train, num_test = splits["train"].num_examples, splits[test_split].num_examples
    else:  # tfds.testing.mock_data has no split sizes: count the (few) mock examples
        num_train, num_test = _count_tfds(name, "train", data_dir), _count_tfds(name, test_split, data_dir)
    if not num_train:
        raise DataError(f"tfds:{name} has no training examples in {data_dir or 'the TFDS data dir'}")
    return RecordSource(name=f"tfds:{name}", kind="tfds", train_files=(), test_files=(), num_train=num_train,
                        num_test=num_test, num_classes=int(builder.info.features["label"].num_classes),
                        tfds_name=name, data_dir=data_dir, test_split=test_split)


def _count_tfds(name, split, data_dir):
    import tensorflow_datasets as tfds

    try:
        ds = tfds.load(name, split=split, data_dir=data_dir or None, download=False,
                       decoders={"image": tfds.decode.SkipDecoding()})
        return int(ds.reduce(0, lambda n, _: n + 1))
    except Exception as e:  # missing files surface as assorted TFDS/IO errors
        raise DataError(f"cannot read tfds:{name} ({split}): {str(e).splitlines()[0]}") from None


def load_tfds_in_memory(name, data_dir=""):
    """A TFDS data set with fixed-size images as uint8 arrays. The stable index is the position in
    TFDS's deterministic (unshuffled) order of the "train" split; evaluation uses "test" (or
    "validation")."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir)
    info = builder.info
    if None in info.features["image"].shape:
        raise DataError(f"tfds:{name} has images of varying size and cannot be held in memory")

    def arrays(split):
        try:
            ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False, download=False)
            chunks = list(tfds.as_numpy(ds.map(lambda x: (x["image"], x["label"])).batch(4096)))
        except Exception as e:  # missing files surface as assorted TFDS/IO errors
            raise DataError(f"cannot read tfds:{name} ({split}) from {data_dir or 'the TFDS data dir'}: "
                            f"{str(e).splitlines()[0]}") from None
        if not chunks:
            raise DataError(f"tfds:{name} ({split}) is empty")
        return (np.concatenate([c[0] for c in chunks]),
                np.concatenate([c[1] for c in chunks]).astype(np.int32))

    train_images, train_labels = arrays("train")
    try:
        test_images, test_labels = arrays("test")
    except DataError:
        test_images, test_labels = arrays("validation")
    return InMemorySource(name, train_images, train_labels, test_images, test_labels,
                          int(info.features["label"].num_classes))


def read_class_list(class_list):
    """Class folder names from --class_list: a name in CLASS_LISTS or a file with one name per line."""
    path = CLASS_LISTS.get(class_list, class_list)
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise DataError(f"cannot read --class_list {class_list}: {e.strerror or e}") from None
    if len(set(names)) != len(names) or not names:
        raise DataError(f"--class_list {class_list} is empty or names a class twice")
    return names


def check_image_file(path):
    """Why `path` is not a complete JPEG/PNG file, or None. Reads its first and last bytes only: a
    truncated JPEG lacks its end-of-image marker, which would stop training at decode time."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(size - 1024, 0))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size == 0:
        return "empty file"
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG image"


def _scan_split(root, classes, allow_missing=False):
    """(files, labels, non-image count) of root/<class>/* for the given classes."""
    files, labels, ignored = [], [], 0
    for label, cls in enumerate(classes):
        d = os.path.join(root, cls)
        if not os.path.isdir(d):
            if allow_missing:
                continue
            raise DataError(f"class folder {d} does not exist")
        names = sorted(os.listdir(d))
        images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        ignored += len(names) - len(images)
        if not images and not allow_missing:
            raise DataError(f"class folder {d} holds no images (*.jpg, *.jpeg, *.png)")
        files += [os.path.join(d, n) for n in images]
        labels += [label] * len(images)
    return files, labels, ignored


def _drop_corrupt(files, labels, max_fraction, what):
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        reasons = list(pool.map(check_image_file, files))
    bad = [(f, r) for f, r in zip(files, reasons) if r]
    if len(bad) > max_fraction * max(len(files), 1):
        shown = "; ".join(f"{f}: {r}" for f, r in bad[:3])
        raise DataError(f"{len(bad)} of {len(files)} {what} images are corrupt, more than "
                        f"--max_corrupt_fraction={max_fraction} (first: {shown})")
    keep = [r is None for r in reasons]
    return ([f for f, k in zip(files, keep) if k], [lab for lab, k in zip(labels, keep) if k], bad)


def _walk_images(root, skip=()):
    """Every image file under `root` (any depth, sorted paths), leaving out the directories in `skip`."""
    found, ignored = [], 0
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(x for x in subdirs if os.path.join(d, x) not in skip)
        for n in sorted(names):
            if n.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(d, n))
            else:
                ignored += 1
    return found, ignored


def _holds_images(d):
    return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(d))


def load_images(data_dir, max_corrupt_fraction=0.001):
    """Unlabelled images for self-supervised training: every image under data_dir/train/ (or under
    data_dir when it has no train/), at any depth — folder names are not labels. A val/<class>/ tree
    beside it, if any, is labelled and serves k-NN evaluation (sources.knn_source)."""
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"--dataset=images needs --data_dir, a directory of images (got {data_dir!r})")
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    root = train_dir if os.path.isdir(train_dir) else data_dir
    train_files, _ = _walk_images(root, skip=(val_dir,))
    if not train_files:
        raise DataError(f"{root} holds no images (*.jpg, *.jpeg, *.png) at any depth")
    classes, test_files, test_labels = (), [], []
    if os.path.isdir(val_dir):
        classes = tuple(sorted(e.name for e in os.scandir(val_dir) if e.is_dir() and _holds_images(e.path)))
        test_files, test_labels, _ = _scan_split(val_dir, classes)
    train_files, _, bad_train = _drop_corrupt(train_files, [-1] * len(train_files), max_corrupt_fraction, "training")
    test_files, test_labels, bad_test = _drop_corrupt(test_files, test_labels, max_corrupt_fraction, "validation")
    return FileSource(
        name=f"images:{os.path.basename(os.path.normpath(data_dir))}",
        train_files=np.array(train_files), train_labels=np.full(len(train_files), -1, np.int32),
        test_files=np.array(test_files, dtype=str), test_labels=np.array(test_labels, np.int32),
        num_classes=len(classes), class_names=classes, skipped=tuple(bad_train + bad_test), train_labelled=False)


def load_folder(data_dir, class_list="", max_corrupt_fraction=0.001):
    """An ImageNet-style tree: data_dir/train/<class>/*.JPEG and data_dir/val/<class>/*. Classes are
    the sorted folder names of train/ (or --class_list, e.g. imagenet100), labelled 0..C-1 in sorted
    order as torchvision's ImageFolder does. Corrupt files are left out (and reported) unless more than
    `max_corrupt_fraction` of a split is corrupt; other files (no image extension) are ignored."""
    if not data_dir:
        raise DataError("--dataset=folder needs --data_dir (a directory with train/<class>/ and val/<class>/)")
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    if os.path.isdir(train_dir) and not class_list and _holds_images(train_dir):
        return load_images(data_dir, max_corrupt_fraction)  # images directly in train/: no classes
    for d in (data_dir, train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"{d} does not exist (--dataset=folder expects train/<class>/ and val/<class>/)")
    if class_list:
        classes = sorted(read_class_list(class_list))
        missing = [c for c in classes if not os.path.isdir(os.path.join(train_dir, c))]
        if missing:
            raise DataError(f"{len(missing)} classes of --class_list {class_list} have no folder in {train_dir} "
                            f"(first: {', '.join(missing[:5])})")
    else:
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if not classes:
            raise DataError(f"{train_dir} has no class folders")
    train_files, train_labels, _ = _scan_split(train_dir, classes)
    test_files, test_labels, _ = _scan_split(val_dir, classes, allow_missing=True)
    if not test_files:
        raise DataError(f"{val_dir} holds no images of the training classes")
    train_files, train_labels, bad_train = _drop_corrupt(train_files, train_labels, max_corrupt_fraction, "training")
    test_files, test_labels, bad_test = _drop_corrupt(test_files, test_labels, max_corrupt_fraction, "validation")
    return FileSource(
        name=f"folder:{os.path.basename(os.path.normpath(data_dir))}",
        train_files=np.array(train_files), train_labels=np.array(train_labels, np.int32),
        test_files=np.array(test_files), test_labels=np.array(test_labels, np.int32),
        num_classes=len(classes), class_names=tuple(classes), skipped=tuple(bad_train + bad_test))


def load_tfrecord(data_dir):
    """Sharded TFRecords in our schema with their index.json (see tools/folder_to_tfrecord.py)."""
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir or '(empty)'} does not exist (--dataset=tfrecord)")
    path = os.path.join(data_dir, TFRECORD_INFO)
    try:
        with open(path) as f:
            info = json.load(f)
        splits = info["splits"]
        train, val = splits["train"], splits["val"]
    except OSError:
        raise DataError(f"{path} is missing: write TFRecords with tools/folder_to_tfrecord.py") from None
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not an index.json of tools/folder_to_tfrecord.py") from None
    files = {}
    for split, entry in (("train", train), ("val", val)):
        files[split] = tuple(os.path.join(data_dir, f) for f in entry["files"])
        missing = [f for f in files[split] if not os.path.isfile(f)]
        if missing:
            raise DataError(f"{len(missing)} {split} shards listed in {path} are missing (first: {missing[0]})")
    labels = np.array(train["labels"], np.int32)
    return RecordSource(
        name=f"tfrecord:{os.path.basename(os.path.normpath(data_dir))}", kind="tfrecord",
        train_files=files["train"], test_files=files["val"], num_train=len(labels), num_test=int(val["count"]),
        num_classes=len(info["class_names"]), train_labels=labels, train_names=np.array(train["names"]),
        data_dir=data_dir)


def download_fashion_mnist():
    """Fallback when Debian's dataset-fashion-mnist is not installed: keras.datasets (needs internet)."""
    try:
        import keras

        (xtr, ytr), (xte, yte) = keras.datasets.fashion_mnist.load_data()
    except Exception as e:  # any network or cache failure is the same problem to the user
        raise DataError(f"Fashion-MNIST is neither in {DEFAULT_DIRS['fashion_mnist']} (apt-get install "
                        f"dataset-fashion-mnist) nor downloadable: {e}") from None
    return InMemorySource("fashion_mnist", xtr[..., None], ytr.astype(np.int32), xte[..., None],
                          yte.astype(np.int32), 10)


def read_idx(path):
    """An IDX file (optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + int(np.prod(dims)):
        raise DataError(f"{path} is truncated or corrupt (expected shape {dims})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)

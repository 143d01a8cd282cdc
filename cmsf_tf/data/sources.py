"""Where training and evaluation images come from.

A source gives every training example a stable dataset index 0..N-1 (its position in the source),
which banks, per-image pools and label splits are keyed by.
"""

import dataclasses
import gzip
import os

import numpy as np

DEFAULT_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
DATASETS = ("fashion_mnist", "tfds:NAME[/CONFIG]")
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
    def image_shape(self):
        return self.train_images.shape[1:]


def _tfds_name(dataset):
    """NAME[/CONFIG] of a "tfds:NAME[/CONFIG]" data set, else None."""
    prefix, _, name = dataset.partition(":")
    return name if prefix == "tfds" and name else None


def is_known(dataset):
    return dataset == "fashion_mnist" or _tfds_name(dataset) is not None


def load(dataset, data_dir=""):
    if _tfds_name(dataset):
        return load_tfds_in_memory(_tfds_name(dataset), data_dir)
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


def load_tfds_in_memory(name, data_dir=""):
    """A TFDS data set with fixed-size images (CIFAR-10/100, STL-10, SVHN, ...) as uint8 arrays.

    The stable index is the position in TFDS's deterministic (unshuffled) order of the "train" split;
    evaluation uses "test" (or "validation"). Data sets whose images vary in size (ImageNet) need a
    streaming pipeline instead and are refused with a sentence that says so."""
    import tensorflow_datasets as tfds

    if data_dir and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} does not exist")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # TFDS raises several types for unknown names and configs
        raise DataError(f"TFDS does not know the data set {name!r}: {str(e).splitlines()[0]}") from None
    info = builder.info
    image_keys = [k for k, f in info.features.items() if isinstance(f, tfds.features.Image)]
    if "image" not in image_keys or "label" not in info.features:
        raise DataError(f"tfds:{name} has no 'image' and 'label' features")
    shape = info.features["image"].shape
    if None in shape:
        raise DataError(f"tfds:{name} has images of varying size and cannot be held in memory; "
                        "the streaming ImageNet-scale input pipeline is not available yet")
    # Split sizes are known once the data set is prepared (not under tfds.testing.mock_data).
    num_train = info.splits["train"].num_examples if "train" in info.splits else 0
    if num_train * int(np.prod(shape)) > IN_MEMORY_LIMIT:
        raise DataError(f"tfds:{name} is too large to hold in memory ({num_train} images of {shape})")

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

"""What every data source answers, and the three ways a source holds its images.

A source gives every training example a stable dataset index 0..N-1, the same in every epoch and on
every worker, which banks, per-image pools, cluster ids and label splits are keyed by. Three kinds of
storage, each a `Source`:

- `InMemorySource`: uint8 arrays (Fashion-MNIST, CIFAR-sized TFDS sets); index = position.
- `FileSource`: an ImageNet-style folder of encoded images read per example; index = position in the
  sorted (class, file name) list. Random access keeps the data order a pure function of (seed, epoch).
- `RecordSource`: sharded records read sequentially (our TFRecord schema, or a TFDS split too large for
  memory); the index travels inside each record (TFRecord) or is the position in TFDS's fixed file order.

Callers outside cmsf_tf/data ask a source (`has_train_labels()`, `knn_source()`, `random_access`, ...)
rather than test its class; only the input pipeline (data/pipeline.py) reads each storage its own way.
"""

import dataclasses

import numpy as np

from cmsf_tf.errors import UserError


class DataError(UserError):
    """A problem with the user's data, reported as one sentence."""


class Source:
    """The questions every source answers (defaults for a labelled, random-access source)."""

    random_access = True  # images can be read by index (the bank's neighbours can be shown)
    skipped = ()  # (path, reason) of files left out as corrupt
    image_shape = None  # (H, W, C) when every image has it
    class_names = ()  # the classes' names where the source has them (folder names)

    def has_train_labels(self):
        """Whether the training images have labels (an unlabelled image folder's have none)."""
        return True

    def knn_source(self):
        """The labelled source k-NN evaluation uses: this one when its training images are labelled,
        else a labelled stand-in or None."""
        return self if self.has_train_labels() else None

    def no_labels_reason(self, dataset, what):
        """One sentence: why `what` (e.g. "k-NN evaluation") cannot run on this unlabelled source."""
        return (f"{what} needs labels, and {dataset}'s training images have none (no class folders)"
                + ("" if self.num_test else " and there is no labelled val/<class>/ folder"))

    def raw_image(self, split, index):
        """Image `index` of a split as stored: a uint8 array or encoded bytes (random-access sources)."""
        raise NotImplementedError(f"{self.name} is read as a stream")

    def train_example_names(self, indices):
        """The names the input pipeline gives these training examples (label-split files key by them)."""
        raise NotImplementedError(f"{self.name} is read as a stream")

    def pixel_arrays(self):
        """(train images, test images) as uint8 arrays when the source holds them, else None."""
        return None


@dataclasses.dataclass(frozen=True)
class InMemorySource(Source):
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

    def raw_image(self, split, index):
        return (self.train_images if split == "train" else self.test_images)[index]

    def train_example_names(self, indices):
        return np.asarray(indices).astype(str)

    def pixel_arrays(self):
        return self.train_images, self.test_images


@dataclasses.dataclass(frozen=True)
class FileSource(Source):
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

    def has_train_labels(self):
        return self.train_labelled

    def knn_source(self):
        """For unlabelled training images with a labelled val/: val/ split in two (every other image of the
        sorted (class, file) list as the index, the rest as queries)."""
        if self.train_labelled:
            return self
        if not self.num_test:
            return None
        index, queries = slice(0, None, 2), slice(1, None, 2)
        return dataclasses.replace(
            self, name=f"{self.name}:val", train_files=self.test_files[index],
            train_labels=self.test_labels[index], test_files=self.test_files[queries],
            test_labels=self.test_labels[queries], train_labelled=True)

    def raw_image(self, split, index):
        with open((self.train_files if split == "train" else self.test_files)[index], "rb") as f:
            return f.read()

    def train_example_names(self, indices):
        return [str(self.train_files[i]) for i in indices]


@dataclasses.dataclass(frozen=True)
class RecordSource(Source):
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

    random_access = False


def image_name(path):
    """The key of an image in label-split files: its file name without directories and extension
    ("n01440764_10026"), as in the official 1% / 10% ImageNet lists."""
    base = str(path).strip().replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base

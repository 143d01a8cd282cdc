"""Where training and evaluation images come from: --dataset name -> the module that loads it.

Each kind is one module here with a `load(data_dir, class_list, max_corrupt_fraction)` returning a
`Source` (base.py: what every source answers, and the three storages: arrays, files, records):

  fashion_mnist   idx.py           Fashion-MNIST's IDX files, in memory
  folder          folder.py        train/<class>/ and val/<class>/ trees of JPEG/PNG files
  images          images.py        unlabelled images at any depth (+ an optional labelled val/)
  tfrecord        tfrecord.py      our sharded TFRecords with their index.json
  tfds:NAME       tfds_memory.py   a TFDS set that fits in memory, as arrays
                  tfds_stream.py   a TFDS set read as a stream (ImageNet), and the choice between the two

A new kind is a module with `load` (returning one of the three storages, or a new Source whose storage
data/pipeline.py learns to read) and one line in KINDS. Loading needs NumPy only (TFDS loads on use).
"""

from cmsf_tf.data.sources import folder, idx, images, tfrecord
from cmsf_tf.data.sources.base import (DataError, FileSource, InMemorySource, RecordSource,  # noqa: F401
                                       Source, image_name)
from cmsf_tf.data.sources.files import IMAGE_EXTENSIONS, check_image_file  # noqa: F401
from cmsf_tf.data.sources.folder import CLASS_LISTS, load_folder, read_class_list  # noqa: F401
from cmsf_tf.data.sources.idx import download_fashion_mnist, load_fashion_mnist, read_idx  # noqa: F401
from cmsf_tf.data.sources.images import load_images  # noqa: F401
from cmsf_tf.data.sources.tfds_memory import IN_MEMORY_LIMIT, load_tfds_in_memory  # noqa: F401
from cmsf_tf.data.sources.tfds_stream import load_tfds
from cmsf_tf.data.sources.tfrecord import TFRECORD_INFO, load_tfrecord  # noqa: F401

KINDS = {"fashion_mnist": idx.load, "folder": folder.load, "images": images.load, "tfrecord": tfrecord.load}
DATASETS = (*KINDS, "tfds:NAME[/CONFIG]")
DEFAULT_DIRS = {"fashion_mnist": idx.DEFAULT_DIR}


def _tfds_name(dataset):
    """NAME[/CONFIG] of a "tfds:NAME[/CONFIG]" data set, else None."""
    prefix, _, name = dataset.partition(":")
    return name if prefix == "tfds" and name else None


def is_known(dataset):
    return dataset in KINDS or _tfds_name(dataset) is not None


def load(dataset, data_dir="", class_list="", max_corrupt_fraction=0.001):
    """The Source of --dataset (with --data_dir, --class_list, --max_corrupt_fraction)."""
    if _tfds_name(dataset):
        return load_tfds(_tfds_name(dataset), data_dir)
    if dataset in KINDS:
        return KINDS[dataset](data_dir, class_list, max_corrupt_fraction)
    raise DataError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")


# The questions as functions of a source (the library's names from before sources answered them).
def has_train_labels(source):
    return source.has_train_labels()


def knn_source(source):
    return source.knn_source()


def no_labels_reason(source, dataset, what):
    return source.no_labels_reason(dataset, what)

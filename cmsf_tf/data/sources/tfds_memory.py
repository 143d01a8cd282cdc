"""TFDS data sets with fixed-size images that fit in memory (CIFAR, STL-10, SVHN), as uint8 arrays."""

import contextlib
import logging
import os

import numpy as np

from cmsf_tf.data.sources.base import DataError, InMemorySource

# Beyond this many bytes of decoded training images a TFDS data set is not held in memory.
IN_MEMORY_LIMIT = 4 << 30
# What TFDS's ImageNet builder wants in <data_dir>/downloads/manual/ (its MANUAL_DOWNLOAD_INSTRUCTIONS).
_MANUAL_FILES = {"imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"}


def read_error(name, split, data_dir, error):
    """The DataError of a TFDS split that cannot be read: for a data set that was never prepared, how to
    prepare it (manual-download data sets such as ImageNet: where to put the archives), or to use a folder."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "could not find data" not in first and "not been prepared" not in first:
        return DataError(f"cannot read tfds:{name} ({split}) from {data_dir or 'the TFDS data dir'}: {first}")
    where = data_dir or os.path.join("~", "tensorflow_datasets")
    base = name.split("/")[0]
    if base in _MANUAL_FILES or base.startswith("imagenet"):
        archives = _MANUAL_FILES.get(base, "the archives its TFDS page names")
        how = (f"put {archives} in {os.path.join(where, 'downloads', 'manual')}/ and run `tfds build {name} "
               f"--data_dir={where}` once, or use --dataset=folder --data_dir=DIR with DIR/train/<class>/*.JPEG "
               "and DIR/val/<class>/*.JPEG")
    else:
        how = (f"run `tfds build {name} --data_dir={where}` once on a machine with internet, or pass the TFDS "
               "data directory that holds it as --data_dir")
    return DataError(f"tfds:{name} is not prepared in {where}: {how}")


def _no_unprepared_variant_warning(record):
    message = record.getMessage()
    return not (message.startswith("Variant folder") and "has no dataset_info.json" in message)


@contextlib.contextmanager
def without_unprepared_warning():
    """For a data set not prepared, TFDS logs "Variant folder <dir> has no dataset_info.json" about a folder
    that does not exist, before our sentence says how to prepare it: that line is dropped, others kept."""
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_no_unprepared_variant_warning)
    try:
        yield
    finally:
        absl_logger.removeFilter(_no_unprepared_variant_warning)


def _tfds_builder(name, data_dir):
    import tensorflow_datasets as tfds

    if data_dir and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} does not exist")
    try:
        with without_unprepared_warning():
            builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # TFDS raises several types for unknown names and configs
        raise DataError(f"TFDS does not know the data set {name!r}: {str(e).splitlines()[0]}") from None
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image) or "label" not in features:
        raise DataError(f"tfds:{name} has no 'image' and 'label' features")
    return builder


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
            with without_unprepared_warning():  # tfds.load makes a builder of its own
                ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False, download=False)
            chunks = list(tfds.as_numpy(ds.map(lambda x: (x["image"], x["label"])).batch(4096)))
        except Exception as e:  # missing files surface as assorted TFDS/IO errors
            raise read_error(name, split, data_dir, e) from None
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

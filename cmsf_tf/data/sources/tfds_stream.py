"""TFDS data sets read as a stream (imagenet2012, imagenet2012_subset/10pct, food101, ...), and the
choice between streaming and memory for `--dataset=tfds:NAME[/CONFIG]`."""

import numpy as np

from cmsf_tf.data.sources.base import DataError, RecordSource
from cmsf_tf.data.sources.tfds_memory import (IN_MEMORY_LIMIT, _tfds_builder, load_tfds_in_memory, read_error,
                                              without_unprepared_warning)


def load_tfds(name, data_dir=""):
    """A TFDS data set: held in memory when its images have a fixed size and fit (CIFAR, STL-10, SVHN),
    streamed otherwise (imagenet2012, imagenet2012_subset/10pct, food101, ...)."""
    builder = _tfds_builder(name, data_dir)
    shape = builder.info.features["image"].shape
    num_train = builder.info.splits["train"].num_examples if "train" in builder.info.splits else 0
    if None in shape or num_train * int(np.prod(shape)) > IN_MEMORY_LIMIT:
        return _tfds_stream(name, builder, data_dir)
    return load_tfds_in_memory(name, data_dir)


def _tfds_eval_split(builder):
    splits = builder.info.splits
    for split in ("test", "validation"):
        if split in splits or not splits:  # no split info under tfds.testing.mock_data: try in order
            return split
    raise DataError(f"tfds:{builder.info.name} has neither a 'test' nor a 'validation' split")


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
        with without_unprepared_warning():
            ds = tfds.load(name, split=split, data_dir=data_dir or None, download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
        return int(ds.reduce(0, lambda n, _: n + 1))
    except Exception as e:  # missing files surface as assorted TFDS/IO errors
        raise read_error(name, split, data_dir, e) from None

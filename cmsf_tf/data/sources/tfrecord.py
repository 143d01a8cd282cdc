"""--dataset=tfrecord: sharded TFRecords in our schema (tools/folder_to_tfrecord.py), read in sequence."""

import json
import os

import numpy as np

from cmsf_tf.data.sources.base import DataError, RecordSource

# The index of a TFRecord directory: splits, shard files, labels and names (docs/data.md).
TFRECORD_INFO = "index.json"


def load(data_dir="", class_list="", max_corrupt_fraction=0.001):
    return load_tfrecord(data_dir)


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

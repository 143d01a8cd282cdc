"""--dataset=images: unlabelled images at any depth, with an optional labelled val/<class>/ tree."""

import os

import numpy as np

from cmsf_tf.data.sources.base import DataError, FileSource
from cmsf_tf.data.sources.files import _drop_corrupt, _holds_images, _scan_split, _walk_images


def load(data_dir="", class_list="", max_corrupt_fraction=0.001):
    return load_images(data_dir, max_corrupt_fraction)


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

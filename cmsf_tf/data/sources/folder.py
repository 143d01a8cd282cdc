"""--dataset=folder: an ImageNet-style tree of class folders (train/<class>/, val/<class>/)."""

import os

import numpy as np

from cmsf_tf.data.sources.base import DataError, FileSource
from cmsf_tf.data.sources.files import _drop_corrupt, _holds_images, _scan_split
from cmsf_tf.data.sources.images import load_images

# ImageNet-100: imagenet100 is the CMSF code's subset (util.subset_classes: seed 1234, first 100 of a
# permutation of the sorted class ids); imagenet100_cmc is CMC's list (Tian et al.), shared by 10 classes.
_DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_LISTS = {"imagenet100": os.path.join(_DATA, "imagenet100.txt"),
               "imagenet100_cmc": os.path.join(_DATA, "imagenet100_cmc.txt")}


def load(data_dir="", class_list="", max_corrupt_fraction=0.001):
    return load_folder(data_dir, class_list, max_corrupt_fraction)


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

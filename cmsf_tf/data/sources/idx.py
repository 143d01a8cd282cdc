"""Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist), held in memory."""

import gzip
import os

import numpy as np

from cmsf_tf.data.sources.base import DataError, InMemorySource

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def load(data_dir="", class_list="", max_corrupt_fraction=0.001):
    """--dataset=fashion_mnist: --data_dir, else the usual place, else keras.datasets."""
    if not data_dir and not os.path.isdir(DEFAULT_DIR):
        return download_fashion_mnist()
    return load_fashion_mnist(data_dir or DEFAULT_DIR)


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


def download_fashion_mnist():
    """Fallback when Debian's dataset-fashion-mnist is not installed: keras.datasets (needs internet)."""
    try:
        import keras

        (xtr, ytr), (xte, yte) = keras.datasets.fashion_mnist.load_data()
    except Exception as e:  # any network or cache failure is the same problem to the user
        raise DataError(f"Fashion-MNIST is neither in {DEFAULT_DIR} (apt-get install "
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

"""Data sources: Fashion-MNIST IDX files, TFDS (through tfds.testing.mock_data), clear errors."""

import gzip
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cmsf_tf import config, train
from cmsf_tf.data import sources
from tests.conftest import write_idx


def test_fashion_mnist_has_its_real_shape(fmnist_full):
    assert fmnist_full.train_images.shape == (60000, 28, 28, 1)
    assert fmnist_full.test_images.shape == (10000, 28, 28, 1)
    assert set(np.unique(fmnist_full.train_labels)) == set(range(10))


def test_truncated_idx_file_is_reported(tmp_path, fmnist_slice):
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(open(f"{fmnist_slice}/{name}", "rb").read())
    data = gzip.decompress(open(f"{fmnist_slice}/train-images-idx3-ubyte.gz", "rb").read())
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-100])
    with pytest.raises(sources.DataError, match="truncated or corrupt"):
        sources.load_fashion_mnist(str(tmp_path))


def test_idx_round_trip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(sources.read_idx(str(tmp_path / "x.gz")), arr)


def test_tfds_cifar10_in_memory():
    with tfds.testing.mock_data(num_examples=48):
        src = sources.load("tfds:cifar10")
    assert src.train_images.shape == (48, 32, 32, 3) and src.train_images.dtype == np.uint8
    assert src.test_images.shape[1:] == (32, 32, 3) and src.num_classes == 10
    assert src.train_labels.min() >= 0 and src.train_labels.max() < 10


def test_tfds_errors_are_sentences():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(sources.DataError, match="varying size"):
            sources.load("tfds:imagenet2012")
    with pytest.raises(sources.DataError, match="TFDS does not know the data set 'no_such_set'"):
        sources.load("tfds:no_such_set")
    assert sources.is_known("tfds:cifar100") and not sources.is_known("tfds:") and not sources.is_known("mnist")


def test_training_run_on_a_tfds_data_set(tmp_path):
    fields = dict(method="msf", dataset="tfds:cifar10", data_dir="", model_dir=str(tmp_path / "run"),
                  arch="resnet18_small", width=4, image_size=32, epochs=1, batch_size=16, learning_rate=0.05,
                  warmup_epochs=0, momentum=0.9, weight_decay=1e-4, ema_momentum=0.99, bank_size=32, topk=2,
                  crop_min_scale=0.2, label_split="", label_noise=0.0, blur_prob=0.5, proj_hidden=16, proj_dim=8, strategy="default",
                  cpu_devices=1, tpu="", mixed_precision="float32", seed=0, steps_per_epoch=2,
                  checkpoint_steps=0, stop_after_steps=0, log_steps=1, deterministic=False, knn_eval=True,
                  knn_baselines=False, eval_batch_size=16)
    cfg = config.Config(**fields)
    config.validate(cfg)
    with tfds.testing.mock_data(num_examples=40):
        result = train.run(cfg, log=lambda *_: None)
    assert result["steps"] == 2 and 0 <= result["knn_top1_k20"] <= 1
    assert json.loads((tmp_path / "run" / "result.json").read_text())["dataset"] == "tfds:cifar10"

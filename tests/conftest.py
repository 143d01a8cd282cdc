"""Shared fixtures: a small real Fashion-MNIST slice and a CLI runner."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# End-to-end tests start Python processes (the CLIs, the tools, multi-process distribution): every test of
# these modules, and elsewhere each test whose body starts one. `make test-fast` deselects them.
E2E_MODULES = ("test_train_cli", "test_evaluate", "test_bench_tools", "test_reproduce_small", "test_tools",
               "test_constraint_purity")


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts Python processes (CLI end to end); make test-fast skips them")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        if module in E2E_MODULES or "run_cli(" in source or "subprocess." in source:
            item.add_marker(pytest.mark.e2e)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="session")
def fmnist_full():
    from cmsf_tf.data import sources

    return sources.load("fashion_mnist")  # Debian's copy, else keras.datasets


@pytest.fixture(scope="session")
def fmnist_slice(tmp_path_factory, fmnist_full):
    """The first 512 training and 256 test images of the real Fashion-MNIST, as IDX files."""
    d = tmp_path_factory.mktemp("fmnist_slice")
    write_idx(d / "train-images-idx3-ubyte.gz", fmnist_full.train_images[:512, ..., 0])
    write_idx(d / "train-labels-idx1-ubyte.gz", fmnist_full.train_labels[:512])
    write_idx(d / "t10k-images-idx3-ubyte.gz", fmnist_full.test_images[:256, ..., 0])
    write_idx(d / "t10k-labels-idx1-ubyte.gz", fmnist_full.test_labels[:256])
    return str(d)


# Flags of a tiny, fast run on the slice.
TINY = ["--method=msf", "--dataset=fashion_mnist", "--arch=resnet18_small", "--width=4", "--image_size=28",
        "--batch_size=32", "--bank_size=128", "--topk=3", "--proj_hidden=32", "--proj_dim=16",
        "--learning_rate=0.05", "--log_steps=1"]


@pytest.fixture(scope="session")
def tiny_msf_run(tmp_path_factory, fmnist_slice):
    """A tiny MSF run (2 epochs of 4 steps) with a 25% label split: its checkpoints and flags.json. Shared by
    the evaluation and export tests; each test that writes into it (eval/) writes before it reads."""
    d = tmp_path_factory.mktemp("tiny_msf") / "run"
    out = run_cli("cmsf_tf.train", *TINY, f"--data_dir={fmnist_slice}", f"--model_dir={d}", "--epochs=2",
                  "--steps_per_epoch=4", "--label_split=percent:25", "--noknn_eval")
    assert out.returncode == 0, out.stderr[-3000:]
    return d


def read_events(logdir):
    """TensorBoard's EventAccumulator over `logdir`, loaded: TF2 summaries are under Tags()["tensors"]."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def run_cli(module, *args, timeout=600, env=None):
    """Runs `python -m module args` from the repository (with `env`'s variables on top of this process's);
    returns the CompletedProcess."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def make_image_tree(root, classes=("cat", "dog", "owl"), per_class=6, val_per_class=2, seed=0):
    """An ImageNet-style tree of real JPEGs of assorted sizes: root/{train,val}/<class>/<class>_<i>.JPEG.
    Returns {(split, class): [paths]}."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    made = {}
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, cls in enumerate(classes):
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(40, 90, size=2)
                pixels = np.clip(rng.normal(60 + 70 * c, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                path = os.path.join(d, f"{cls}_{i}.JPEG")
                with open(path, "wb") as f:
                    f.write(tf.io.encode_jpeg(pixels).numpy())
                made.setdefault((split, cls), []).append(path)
    return made

"""Data sources: Fashion-MNIST IDX files, TFDS (through tfds.testing.mock_data), clear errors."""

import gzip
import json

import os

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
    with pytest.raises(sources.DataError, match="TFDS does not know the data set 'no_such_set'"):
        sources.load("tfds:no_such_set")
    assert sources.is_known("tfds:cifar100") and not sources.is_known("tfds:") and not sources.is_known("mnist")


def test_training_run_on_a_tfds_data_set(tmp_path):
    cfg = config.make(method="msf", dataset="tfds:cifar10", model_dir=str(tmp_path / "run"), arch="resnet18_small",
                      width=4, image_size=32, epochs=1, batch_size=16, bank_size=32, topk=2, proj_hidden=16,
                      proj_dim=8, steps_per_epoch=2, checkpoint_steps=0, eval_batch_size=16)
    with tfds.testing.mock_data(num_examples=40):
        result = train.run(cfg, log=lambda *_: None)
    assert result["steps"] == 2 and 0 <= result["knn_top1_k20"] <= 1
    assert json.loads((tmp_path / "run" / "result.json").read_text())["dataset"] == "tfds:cifar10"


def test_folder_source_indexes_sorted_classes_and_files(tmp_path):
    from tests.conftest import make_image_tree

    made = make_image_tree(str(tmp_path), classes=("b_owl", "a_cat"), per_class=3)
    (tmp_path / "train" / "a_cat" / "notes.txt").write_text("not an image")  # ignored
    src = sources.load("folder", str(tmp_path))
    assert src.class_names == ("a_cat", "b_owl") and src.num_classes == 2
    assert list(src.train_files) == sorted(made[("train", "a_cat")]) + sorted(made[("train", "b_owl")])
    assert list(src.train_labels) == [0, 0, 0, 1, 1, 1] and src.num_test == 4
    assert list(src.train_names[:2]) == ["a_cat_0", "a_cat_1"] and not src.skipped


def test_corrupt_images_are_skipped_and_named_until_too_many(tmp_path):
    from tests.conftest import make_image_tree

    made = make_image_tree(str(tmp_path), per_class=10)
    truncated = made[("train", "dog")][3]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    garbage = tmp_path / "train" / "owl" / "owl_x.JPEG"
    garbage.write_bytes(b"this is no image")
    src = sources.load_folder(str(tmp_path), max_corrupt_fraction=0.1)
    assert src.num_train == 29 and {p for p, _ in src.skipped} == {truncated, str(garbage)}
    assert dict(src.skipped)[truncated].startswith("truncated JPEG")
    assert truncated not in set(src.train_files)
    with pytest.raises(sources.DataError, match=r"2 of 31 training images are corrupt, more than "
                                                r"--max_corrupt_fraction=0.05 \(first: .*owl_x.JPEG: not a JPEG"):
        sources.load_folder(str(tmp_path), max_corrupt_fraction=0.05)


def test_folder_errors_are_sentences(tmp_path):
    from tests.conftest import make_image_tree

    with pytest.raises(sources.DataError, match="needs --data_dir"):
        sources.load("folder", "")
    with pytest.raises(sources.DataError, match="does not exist"):
        sources.load("folder", str(tmp_path / "nowhere"))
    make_image_tree(str(tmp_path), per_class=2)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(sources.DataError, match=r"class folder .*train/empty holds no images"):
        sources.load("folder", str(tmp_path))
    with pytest.raises(sources.DataError, match=r"100 classes of --class_list imagenet100 have no folder .*"
                                                r"\(first: n01608432"):
        sources.load("folder", str(tmp_path), class_list="imagenet100")
    listed = tmp_path / "classes.txt"
    listed.write_text("dog\ncat\n")
    src = sources.load("folder", str(tmp_path), class_list=str(listed))
    assert src.class_names == ("cat", "dog") and src.num_train == 4


def test_imagenet100_is_the_cmsf_codes_subset_recomputed_from_the_sorted_imagenet_ids():
    """util.subset_classes of the paper's code: np.random.seed(1234), the first 100 of
    np.random.permutation(1000) over the class ids in sorted order (TFDS ships the 1,000 ids)."""
    import tensorflow_datasets as tfds

    path = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
    with open(path) as f:
        ids = [line.strip() for line in f if line.strip()]
    assert len(ids) == 1000 and ids == sorted(ids)
    np.random.seed(1234)
    want = sorted(ids[i] for i in np.random.permutation(len(ids))[:100])
    assert sorted(sources.read_class_list("imagenet100")) == want


def test_imagenet100_cmc_is_cmcs_list():
    names = sources.read_class_list("imagenet100_cmc")
    assert len(names) == len(set(names)) == 100 and all(n.startswith("n") and len(n) == 9 for n in names)
    assert names[0] == "n02869837" and names[-1] == "n02090622"
    assert len(set(names) & set(sources.read_class_list("imagenet100"))) == 10


def test_tfrecord_errors_are_sentences(tmp_path):
    with pytest.raises(sources.DataError, match="index.json is missing: write TFRecords with"):
        sources.load("tfrecord", str(tmp_path))
    (tmp_path / "index.json").write_text('{"splits": {"train": {"files": ["t-0.tfrecord"], "labels": [], '
                                         '"names": []}, "val": {"files": [], "count": 0}}, "class_names": ["a"]}')
    with pytest.raises(sources.DataError, match="1 train shards listed in .* are missing"):
        sources.load("tfrecord", str(tmp_path))


def test_make_label_split_tool_and_names_split(tmp_path, fmnist_slice):
    from tests.conftest import REPO, run_cli

    out = tmp_path / "split.txt"
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "tools/make_label_split.py", "--dataset=fashion_mnist",
                           f"--data_dir={fmnist_slice}", "--percent=10", f"--output={out}"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    names = out.read_text().split()
    assert len(names) == round(0.1 * 512)
    cfg = config.make(model_dir=str(tmp_path / "m"), data_dir=fmnist_slice, label_split=str(out))
    src = sources.load("fashion_mnist", fmnist_slice)
    plan = train.training_labels(cfg, src)
    labelled = plan.labels >= 0
    np.testing.assert_array_equal(np.flatnonzero(labelled), sorted(int(n) for n in names))
    np.testing.assert_array_equal(plan.labels[labelled], src.train_labels[labelled])
    out.write_text("\n".join(names + ["99999", "n0_missing"]))
    bad = run_cli("cmsf_tf.train", f"--model_dir={tmp_path / 'm2'}", f"--data_dir={fmnist_slice}",
                  f"--label_split={out}")
    assert bad.returncode == 2
    assert ("names 2 images that are not in the data set (first: 99999, n0_missing)"
            in bad.stderr.strip().splitlines()[-1])


def _unlabelled_tree(root, with_val=True):
    """root/train/ holding images at several depths (no class folders) and, optionally, a labelled val/."""
    import shutil

    from tests.conftest import make_image_tree

    made = make_image_tree(str(root), per_class=4, val_per_class=4 if with_val else 0)
    train = root / "train"
    (train / "2021" / "march").mkdir(parents=True)
    for i, path in enumerate(sorted(p for (split, _), ps in made.items() if split == "train" for p in ps)):
        target = [train, train / "2021", train / "2021" / "march"][i % 3] / f"img_{i:02d}.jpg"
        shutil.move(path, target)
    for cls in ("cat", "dog", "owl"):
        (train / cls).rmdir()
    if not with_val:
        shutil.rmtree(root / "val")
    (train / "notes.txt").write_text("not an image")
    return made


def test_unlabelled_image_folders(tmp_path):
    from cmsf_tf.data import sources

    made = _unlabelled_tree(tmp_path)
    for dataset in ("images", "folder"):  # folder: images directly in train/ mean no classes
        src = sources.load(dataset, str(tmp_path))
        assert not sources.has_train_labels(src) and src.num_train == 12
        assert (src.train_labels == -1).all() and len(set(src.train_files)) == 12
        assert all(str(f).startswith(str(tmp_path / "train")) for f in src.train_files)
        assert src.class_names == ("cat", "dog", "owl") and src.num_test == 12
    # k-NN evaluates on val/ split in two: every other image of each class as the index.
    knn = sources.knn_source(src)
    assert sources.has_train_labels(knn) and knn.num_train == 6 and knn.num_test == 6
    assert sorted(knn.train_labels.tolist() + knn.test_labels.tolist()) == sorted(src.test_labels.tolist())
    assert set(knn.train_files) | set(knn.test_files) == set(src.test_files)
    assert set(knn.train_labels.tolist()) == {0, 1, 2}
    # A tree without train/: every image under the directory; without val/: nothing labelled.
    bare = tmp_path / "bare"
    (bare / "a" / "b").mkdir(parents=True)
    for i, path in enumerate(made[("val", "cat")]):
        os.rename(path, bare / ("a" if i % 2 else "a/b") / f"{i}.JPEG")
    src = sources.load("images", str(bare))
    assert src.num_train == 4 and src.num_test == 0 and sources.knn_source(src) is None
    assert "no labelled val/<class>/ folder" in sources.no_labels_reason(src, "images", "k-NN evaluation")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(sources.DataError, match="train holds no images"):
        sources.load("images", str(tmp_path / "empty"))
    with pytest.raises(sources.DataError, match="needs --data_dir, a directory of images"):
        sources.load("images", str(tmp_path / "nowhere"))

"""Label splits and label noise: exact sizes, stratification, reproducibility, clear errors."""

import numpy as np
import pytest

from cmsf_tf.data import splits

LABELS = np.repeat(np.arange(10), [500, 480, 520, 500, 510, 490, 505, 495, 500, 500])


@pytest.mark.parametrize("percent", [1, 10, 33.3])
def test_percent_split_is_exact_stratified_and_seeded(percent):
    keep = splits.percent_split(LABELS, percent, seed=3)
    assert keep.sum() == round(len(LABELS) * percent / 100)
    for cls in range(10):
        share = keep[LABELS == cls].mean()
        assert abs(share - percent / 100) <= 1.0 / (LABELS == cls).sum() + 1e-9
    np.testing.assert_array_equal(keep, splits.percent_split(LABELS, percent, seed=3))
    assert not np.array_equal(keep, splits.percent_split(LABELS, percent, seed=4))


def test_training_labels_hide_unlabelled():
    keep = splits.percent_split(LABELS, 10, seed=0)
    train = splits.training_labels(LABELS, keep)
    np.testing.assert_array_equal(train[keep], LABELS[keep])
    assert (train[~keep] == splits.UNLABELLED).all()


def test_names_split_matches_by_stem_and_reports_unknown_names():
    names = [f"train/n0{c}/n0{c}_{i}.JPEG" for c in range(3) for i in range(4)]
    keep = splits.names_split(names, ["n00_1.JPEG", "n02_3", "n01_0.JPEG\n"])
    assert keep.sum() == 3 and keep[names.index("train/n00/n00_1.JPEG")]
    with pytest.raises(ValueError, match=r"names 2 images that are not in the data set \(first: n09_1, n09_2\)"):
        splits.names_split(names, ["n00_1", "n09_1", "n09_2"])


@pytest.mark.parametrize("percent", [5, 25, 50])
def test_noisy_labels_flip_exactly_p_percent_to_other_classes(percent):
    noisy = splits.noisy_labels(LABELS, percent, 10, seed=1)
    changed = noisy != LABELS
    assert changed.sum() == round(len(LABELS) * percent / 100)
    assert ((noisy >= 0) & (noisy < 10)).all()
    np.testing.assert_array_equal(noisy, splits.noisy_labels(LABELS, percent, 10, seed=1))
    # The new classes are spread over all the others, not a fixed permutation.
    pairs = set(zip(LABELS[changed].tolist(), noisy[changed].tolist()))
    assert len(pairs) == 90 if percent >= 25 else len(pairs) > 60


def test_noise_outside_range_is_refused():
    for bad in (-1, 100, 150):
        with pytest.raises(ValueError, match=r"\[0, 100\)"):
            splits.noisy_labels(LABELS, bad, 10, seed=0)
    assert (splits.noisy_labels(LABELS, 0, 10, seed=0) == LABELS).all()


def test_corruption_list_replaces_exactly_the_listed_labels(tmp_path):
    path = tmp_path / "noise.txt"
    path.write_text("# name label\nimg_3.JPEG 0\nimg_5 2\n")
    names = [f"img_{i}" for i in range(8)]
    labels = np.arange(8) % 3
    got = splits.corrupted_labels(labels, names, splits.read_corruptions(str(path)), 3)
    want = labels.copy()
    want[3], want[5] = 0, 2
    np.testing.assert_array_equal(got, want)
    path.write_text("img_9 1\nimg_1 1\n")
    with pytest.raises(ValueError, match=r"names 1 images that are not in the data set \(first: img_9\)"):
        splits.corrupted_labels(labels, names, splits.read_corruptions(str(path)), 3)
    path.write_text("img_1 7\n")
    with pytest.raises(ValueError, match="labels outside 0..2"):
        splits.corrupted_labels(labels, names, splits.read_corruptions(str(path)), 3)
    path.write_text("img_1\n")
    with pytest.raises(ValueError, match="line 1 of .* is not '<image name> <label>'"):
        splits.read_corruptions(str(path))


def test_the_papers_corruption_list_format_is_read_as_it_is(tmp_path):
    """supervised/subsets/corrupt_*percent.txt of the paper's code: every training image,
    '<class dir>/<file name> <class index>'; names of a folder source are full paths."""
    classes = ["n01440764", "n01443537", "n01484850"]
    names = [f"/data/imagenet/train/{c}/{c}_{i}.JPEG" for c in classes for i in range(4)]
    labels = np.repeat(np.arange(3), 4)
    corrupted = {1: 2, 6: 0, 11: 1}  # position -> the wrong label the list gives
    lines = [f"{c}/{c}_{i}.JPEG {corrupted.get(3 * 0 + k, labels[k])}"
             for k, (c, i) in enumerate((c, i) for c in classes for i in range(4))]
    path = tmp_path / "corrupt_25percent.txt"
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # with a byte-order mark
    got = splits.corrupted_labels(labels, names, splits.read_corruptions(str(path)), 3)
    want = labels.copy()
    for k, y in corrupted.items():
        want[k] = y
    np.testing.assert_array_equal(got, want)
    assert (got != labels).sum() == 3


def test_the_papers_imagenet_label_splits_are_shipped_and_named():
    from cmsf_tf import config

    for name, count in (("imagenet_1percent", 12_811), ("imagenet_10percent", 128_116)):
        names = splits.read_names(name)
        assert len(names) == len(set(names)) == count
        assert all(n.startswith("n") and n.endswith(".JPEG") for n in names[:100])
        assert config.label_split_percent(name) is None  # a names file, not percent:P
    one, ten = set(splits.read_names("imagenet_1percent")), set(splits.read_names("imagenet_10percent"))
    assert len(one & ten) > 0
    for cfg_file, name in (("flags/semi10.cfg", "imagenet_10percent"), ("flags/semi1.cfg", "imagenet_1percent")):
        with open(cfg_file) as f:
            assert f"--label_split={name}\n" in f.read()


def test_a_split_file_with_a_byte_order_mark_reads_its_first_name(tmp_path):
    path = tmp_path / "split.txt"
    path.write_text("\ufeffn01440764_10026.JPEG\nn01440764_1.JPEG\n", encoding="utf-8")
    assert splits.read_names(str(path)) == ["n01440764_10026.JPEG", "n01440764_1.JPEG"]
    keep = splits.names_split(["/t/n01440764/n01440764_10026.JPEG", "/t/n01440764/n01440764_2.JPEG",
                               "/t/n01440764/n01440764_1.JPEG"], splits.read_names(str(path)))
    assert keep.tolist() == [True, False, True]

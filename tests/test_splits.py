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

"""k-NN with ScaNN: exact search equals NumPy brute force; approximate search agrees with it."""

import numpy as np
import pytest

from cmsf_tf.eval import knn


def clustered(n, d, classes, seed, spread=0.35):
    """Unit vectors around `classes` fixed centres (the same centres for every seed)."""
    centres = np.random.default_rng(12345 + d + classes).normal(size=(classes, d))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = centres[labels] + spread * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def numpy_knn(index, index_labels, queries, k, classes):
    nbrs = np.argsort(-(queries @ index.T), axis=1, kind="stable")[:, :k]
    return knn.majority_vote(index_labels[nbrs], classes)


def test_exact_search_equals_numpy_brute_force():
    index, labels = clustered(3000, 32, 10, seed=0, spread=1.0)
    queries, qlabels = clustered(300, 32, 10, seed=1, spread=1.0)
    idx = knn.search(index, queries, 20, mode="exact")
    want = np.argsort(-(queries @ index.T), axis=1, kind="stable")[:, :20]
    sims = queries @ index.T
    # Same neighbours (as sets of similarities, robust to float ties).
    np.testing.assert_allclose(np.take_along_axis(sims, idx, 1), np.take_along_axis(sims, want, 1), atol=1e-5)
    acc = knn.knn_accuracy(index, labels, queries, qlabels, ks=(1, 20), num_classes=10)
    for k in (1, 20):
        assert acc[f"knn_top1_k{k}"] == pytest.approx(np.mean(numpy_knn(index, labels, queries, k, 10) == qlabels))


def test_majority_vote_breaks_ties_towards_the_smallest_label():
    np.testing.assert_array_equal(knn.majority_vote(np.array([[3, 1, 3, 1], [2, 2, 0, 5]]), 6), [1, 2])


def test_approx_search_agrees_with_exact_on_clustered_data():
    # Overlapping clusters: exact 20-NN is right on ~99% of queries, so votes near a tie exist.
    index, labels = clustered(20000, 64, 20, seed=2, spread=1.5)
    queries, qlabels = clustered(1000, 64, 20, seed=3, spread=1.5)
    exact = knn.majority_vote(labels[knn.search(index, queries, 20, "exact")], 20)
    approx = knn.majority_vote(labels[knn.search(index, queries, 20, "approx")], 20)
    assert np.mean(exact == qlabels) < 1.0
    assert np.mean(exact == approx) >= 0.99


def test_k_larger_than_the_index_and_unknown_mode_are_refused():
    index, _ = clustered(10, 8, 2, seed=0)
    with pytest.raises(ValueError, match="larger than the index"):
        knn.search(index, index, 11)
    with pytest.raises(ValueError, match="unknown k-NN search mode"):
        knn.search(index, index, 3, mode="fast")

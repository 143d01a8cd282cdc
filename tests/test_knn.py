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


def test_weighted_vote_and_top5_equal_a_numpy_reference():
    index, labels = clustered(2000, 16, 12, seed=4, spread=1.2)
    queries, qlabels = clustered(200, 16, 12, seed=5, spread=1.2)
    sims = queries @ index.T
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    weights = np.exp(np.take_along_axis(sims, nbrs, 1) / 0.07)
    scores = np.zeros((200, 12))
    for q in range(200):
        for j in range(20):
            scores[q, labels[nbrs[q, j]]] += weights[q, j]
    want_top1 = np.mean(scores.argmax(1) == qlabels)
    want_top5 = np.mean([qlabels[q] in np.argsort(-scores[q], kind="stable")[:5] for q in range(200)])
    report = knn.knn_report(index, labels, queries, qlabels, ks=(1, 20), num_classes=12, vote="weighted")
    assert report["knn_top1_k20"] == pytest.approx(want_top1, abs=1 / 200)  # float ties may flip one query
    assert report["knn_top5_k20"] == pytest.approx(want_top5, abs=1 / 200)
    assert "knn_top5_k1" not in report  # top-5 of one neighbour says nothing
    # The weighted vote differs from the majority vote (else the test would not tell them apart).
    majority = knn.knn_report(index, labels, queries, qlabels, ks=(20,), num_classes=12)
    counts = np.stack([np.bincount(labels[n], minlength=12) for n in nbrs])
    assert majority["knn_top1_k20"] == pytest.approx(np.mean(counts.argmax(1) == qlabels))
    assert np.any(counts.argmax(1) != scores.argmax(1))


def test_approx_settings_scale_with_the_index():
    small, big = knn.approx_settings(5000, 20), knn.approx_settings(1_000_000, 20)
    assert "num_leaves" not in small and small["reorder"] == 1000
    assert big["num_leaves"] == 1000 and big["num_leaves_to_search"] == 100

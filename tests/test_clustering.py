"""Spherical k-means against scikit-learn's KMeans, determinism, empty clusters, chunking."""

import numpy as np
import pytest
import tensorflow as tf

from cmsf_tf import clustering


def clustered(n=4000, k=20, d=32, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = rng.integers(0, k, n)
    x = centers[truth] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def euclidean_inertia(x, assignments, k):
    means = np.stack([x[assignments == j].mean(0) for j in range(k)])
    return float(((x - means[assignments]) ** 2).sum())


def test_inertia_within_one_percent_of_scikit_learn():
    from sklearn.cluster import KMeans

    x, _ = clustered()
    _, assignments, inertia = clustering.spherical_kmeans(x, 20, iters=20, seed=0, init="kmeans++", chunk=1000)
    reference = KMeans(20, n_init=10, random_state=0).fit(x).inertia_
    ours = euclidean_inertia(x, assignments.numpy(), 20)  # the same objective as scikit-learn's
    assert ours <= 1.01 * reference
    # The returned inertia is sum(2 - 2 cos) to unit centroids: close to, and never below, the above.
    assert ours <= float(inertia) <= 1.05 * ours


def test_assignments_are_nearest_centroids_and_centroids_unit():
    x, _ = clustered(n=1000, k=8)
    centroids, assignments, inertia = clustering.spherical_kmeans(x, 8, iters=5, seed=1, chunk=300)
    c = centroids.numpy()
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(assignments.numpy(), np.argmax(x @ c.T, axis=1))  # 300-row chunks, padded
    np.testing.assert_allclose(float(inertia), np.sum(2 - 2 * np.max(x @ c.T, axis=1)), rtol=1e-4)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_deterministic_with_a_seed(init):
    x, _ = clustered(n=800, k=6)
    a = clustering.spherical_kmeans(x, 6, iters=5, seed=3, init=init)[1].numpy()
    b = clustering.spherical_kmeans(x, 6, iters=5, seed=3, init=init)[1].numpy()
    c = clustering.spherical_kmeans(x, 6, iters=5, seed=4, init=init)[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(c, clustering.spherical_kmeans(x, 6, iters=5, seed=3, init=init)[0].numpy())


def test_empty_clusters_are_reseeded():
    # 3 distinct points repeated: random init picks duplicates, so some clusters start empty.
    base = np.eye(3, 16, dtype=np.float32)
    x = np.repeat(base, 50, axis=0)
    x[::7] += 0.01 * np.arange(16, dtype=np.float32)  # a few off-centre points to re-seed with
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, assignments, _ = clustering.spherical_kmeans(x, 5, iters=10, seed=0, init="random")
    assert len(np.unique(assignments.numpy())) == 5


def test_empty_clusters_split_a_large_cluster_as_faiss_does():
    """faiss's rule (Clustering.cpp split_clusters): an empty cluster takes a copy of a cluster with more
    than one point, and the two are pushed apart by +-1/1024 on alternate coordinates."""
    rng = np.random.default_rng(0)
    c = rng.normal(size=(6, 8)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    counts = np.array([0, 40, 1, 0, 9, 30], np.float32)
    out = clustering._split_into_empty(tf.constant(c), tf.constant(counts), 0, 0).numpy()
    sign = np.where(np.arange(8) % 2 == 0, 1 / 1024, -1 / 1024)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    donors = []
    for e in (0, 3):
        (donor,) = [j for j in (1, 4, 5) if np.allclose(out[e], unit(c[j] * (1 + sign)), atol=1e-6)]
        np.testing.assert_allclose(out[donor], unit(c[donor] * (1 - sign)), atol=1e-6)
        donors.append(donor)
    assert len(set(donors)) == 2  # distinct donors, never the single-point cluster 2
    for j in {1, 2, 4, 5} - set(donors):
        np.testing.assert_allclose(out[j], c[j], atol=1e-6)
    # Donors are drawn in proportion to size - 1 (one empty cluster, 300 draws): 39 : 29 : 8 : 29.
    counts = tf.constant(np.array([0, 40, 1, 30, 9, 30], np.float32))
    gave = np.zeros(6)
    for seed in range(300):
        out = clustering._split_into_empty(tf.constant(c), counts, seed, 0).numpy()
        gave += np.abs(out - c).max(axis=1) > 1e-4
    assert gave[0] == 300 and gave[2] == 0 and gave.sum() == 600  # the empty one, and exactly one donor
    share = gave[[1, 3, 4, 5]] / 300
    np.testing.assert_allclose(share, np.array([39, 29, 8, 29]) / 105, atol=0.08)

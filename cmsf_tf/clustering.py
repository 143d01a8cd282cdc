"""Spherical k-means in TensorFlow: clusters unit vectors by cosine similarity (CMSF-KM's constraint).

Runs wherever TF places it (the training accelerator under a strategy's scope). The N x K similarity
matrix is never formed at once: assignment goes through `chunk` rows at a time, so 1.28M x 512 points
into 50,000 clusters needs chunk x K floats (65,536 x 50,000 x 4 B = 13 GB would not fit; the default
chunk 8,192 needs 1.6 GB).
"""

import math

import tensorflow as tf


def _assign(x, centroids, chunk):
    """(int32 [N] nearest centroid, float32 [N] its similarity), `chunk` rows at a time."""
    n = tf.shape(x)[0]
    starts = tf.range(0, n, chunk)

    def one(start):
        block = x[start:start + chunk]
        sims = tf.matmul(block, centroids, transpose_b=True)
        best = tf.argmax(sims, axis=1, output_type=tf.int32)
        return best, tf.reduce_max(sims, axis=1)

    best, sim = tf.map_fn(lambda s: _padded(one, s, chunk, n), starts, parallel_iterations=1,  # 1 block in memory
                          fn_output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.float32)))
    return tf.reshape(best, [-1])[:n], tf.reshape(sim, [-1])[:n]


def _padded(fn, start, chunk, n):
    best, sim = fn(start)
    missing = chunk - tf.shape(best)[0]  # the last block is short: pad to a fixed size for map_fn
    return tf.pad(best, [[0, missing]]), tf.pad(sim, [[0, missing]])


def _kmeans_pp(x, k, seed, trials):
    """Greedy k-means++ seeding (as scikit-learn's): each new centroid is the best of `trials`
    candidates sampled in proportion to their cosine distance (1 - similarity = half the squared
    Euclidean distance) to the nearest centroid so far; stateless randomness."""
    n = tf.shape(x)[0]
    first = tf.random.stateless_uniform([], [seed, 0], 0, n, dtype=tf.int32)
    centroids = tf.TensorArray(tf.float32, size=k).write(0, x[first])
    dist = tf.maximum(1.0 - tf.linalg.matvec(x, x[first]), 0.0)

    def body(i, centroids, dist):
        u = tf.random.stateless_uniform([trials], [seed, i]) * tf.reduce_sum(dist)
        picks = tf.minimum(tf.searchsorted(tf.cumsum(dist), u), n - 1)
        candidate = tf.minimum(dist[None, :], tf.maximum(1.0 - tf.matmul(tf.gather(x, picks), x, transpose_b=True), 0.0))
        best = tf.argmin(tf.reduce_sum(candidate, axis=1), output_type=tf.int32)
        return i + 1, centroids.write(i, x[picks[best]]), candidate[best]

    _, centroids, _ = tf.while_loop(lambda i, *_: i < k, body, (1, centroids, dist))
    return centroids.stack()


@tf.function(reduce_retracing=True)
def spherical_kmeans(x, k, iters=20, seed=0, init="random", chunk=8192):
    """Clusters the unit rows of float32 `x` [N, D] into k groups by cosine similarity.

    Returns (centroids [k, D] unit, assignments int32 [N], inertia) where inertia = sum over points of
    2 - 2 <x, centroid> (the squared Euclidean distance for unit vectors). `init`: "random" (k distinct
    points chosen with the seed) or "kmeans++". An empty cluster is re-seeded with the point that is
    currently farthest from its centroid, so all k clusters stay in use.
    """
    x = tf.cast(x, tf.float32)
    n = tf.shape(x)[0]
    if init == "kmeans++":
        centroids = _kmeans_pp(x, k, seed, trials=2 + int(math.log(k)))
    else:
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=[seed, 1])
        centroids = tf.gather(x, order[:k])

    def step(_, centroids):
        best, sim = _assign(x, centroids, chunk)
        sums = tf.math.unsorted_segment_sum(x, best, k)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(sim), best, k)
        # Re-seed empty clusters with the worst-served points, worst first.
        empty = counts == 0
        worst = tf.math.top_k(-sim, k=tf.minimum(k, n)).indices
        slot = tf.cumsum(tf.cast(empty, tf.int32)) - 1
        reseed = tf.gather(x, tf.gather(worst, tf.maximum(slot, 0)))
        new = tf.where(empty[:, None], reseed, tf.math.l2_normalize(sums, axis=1))
        return _ + 1, new

    _, centroids = tf.while_loop(lambda i, _: i < iters, step, (0, centroids))
    best, sim = _assign(x, centroids, chunk)
    return centroids, best, tf.reduce_sum(2.0 - 2.0 * sim)

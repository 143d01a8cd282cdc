"""Spherical k-means in TensorFlow: clusters unit vectors by cosine similarity (CMSF-KM's constraint).

Runs wherever TF places it (the training accelerator under a strategy's scope). The N x K similarity
matrix is never formed at once: assignment goes through `chunk` rows at a time, so 1.28M x 512 points
into 50,000 clusters needs chunk x K floats (65,536 x 50,000 x 4 B = 13 GB would not fit; the default
chunk 8,192 needs 1.6 GB).
"""

import math

import tensorflow as tf


def _assign(x, centroids, chunk):
    """(int32 [N] nearest centroid, float32 [N] its similarity), `chunk` rows at a time.

    Every block has exactly `chunk` rows (static shapes, as XLA needs): the last block starts early
    enough to end at row N, overlapping its predecessor, and each row's result is read from the block
    that holds it. Nothing is padded or copied."""
    n = tf.shape(x)[0]
    chunk = tf.minimum(chunk, n)
    blocks = (n + chunk - 1) // chunk
    starts = tf.minimum(tf.range(blocks) * chunk, n - chunk)

    def one(start):
        sims = tf.matmul(tf.slice(x, [start, 0], [chunk, -1]), centroids, transpose_b=True)
        return tf.argmax(sims, axis=1, output_type=tf.int32), tf.reduce_max(sims, axis=1)

    best, sim = tf.map_fn(one, starts, parallel_iterations=1,  # 1 block in memory
                          fn_output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.float32)))
    rows = tf.range(n)
    block = rows // chunk
    at = tf.stack([block, rows - tf.gather(starts, block)], axis=1)
    return tf.gather_nd(best, at), tf.gather_nd(sim, at)


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


# faiss's relative perturbation of a split centroid (Clustering.cpp, EPS = 1 / 1024).
_SPLIT_EPS = 1.0 / 1024


def _split_into_empty(centroids, counts, seed, iteration):
    """faiss's rule for empty clusters: each takes a copy of a populated cluster, drawn with probability
    proportional to (size - 1) (distinct donors: Gumbel top-k), and the two copies are pushed apart by
    +-EPS on alternate coordinates, so the next assignment splits the donor's points between them."""
    k = tf.shape(counts)[0]
    empty = counts == 0
    weights = tf.maximum(counts - 1.0, 0.0)
    u = tf.random.stateless_uniform([k], [seed, 1000 + iteration], 1e-12, 1.0)
    scores = tf.where(weights > 0, tf.math.log(tf.maximum(weights, 1e-30)) - tf.math.log(-tf.math.log(u)),
                      -1e30 - tf.cast(tf.range(k), tf.float32))  # never a donor unless nothing else is left
    order = tf.argsort(scores, direction="DESCENDING")
    donor = tf.gather(order, tf.maximum(tf.cumsum(tf.cast(empty, tf.int32)) - 1, 0))
    sign = tf.where(tf.range(tf.shape(centroids)[1]) % 2 == 0, _SPLIT_EPS, -_SPLIT_EPS)
    split = tf.where(empty[:, None], tf.gather(centroids, donor) * (1.0 + sign), centroids)
    gave = tf.math.unsorted_segment_max(tf.cast(empty, tf.float32), donor, k) > 0
    return tf.math.l2_normalize(tf.where(gave[:, None], split * (1.0 - sign), split), axis=1)


def _reseed_farthest(centroids, counts, x, sim, k, n):
    """Each empty cluster restarts at one of the worst-served points, worst first."""
    empty = counts == 0
    worst = tf.math.top_k(-sim, k=tf.minimum(k, n)).indices
    slot = tf.cumsum(tf.cast(empty, tf.int32)) - 1
    return tf.where(empty[:, None], tf.gather(x, tf.gather(worst, tf.maximum(slot, 0))), centroids)


def spherical_kmeans(x, k, iters=20, seed=0, init="random", chunk=8192, empty="split", init_sample=20,
                     jit_compile=False):
    """Clusters the unit rows of float32 `x` [N, D] into k groups by cosine similarity.

    Returns (centroids [k, D] unit, assignments int32 [N], inertia) where inertia = sum over points of
    2 - 2 <x, centroid> (the squared Euclidean distance for unit vectors). `init`: "random" (k distinct
    points chosen with the seed) or "kmeans++" (greedy k-means++ seeding on `init_sample` random points
    per cluster). `empty`: what an empty cluster becomes — "split"
    (faiss's rule: half of a large cluster, see _split_into_empty) or "farthest" (the point currently
    farthest from its centroid); either way all k clusters stay in use. `jit_compile`: the Lloyd
    iterations compiled with XLA (for a training run that compiles: on a TPU nothing else runs on the
    accelerator), once per N; the seeding is not (StatelessShuffle has no XLA kernel): it draws k of N
    indices, or runs k-means++ on a sample, in O(N) work on whatever device TensorFlow places it.
    """
    if empty not in ("split", "farthest"):
        raise ValueError(f"unknown empty-cluster rule {empty!r}; choose split or farthest")
    centroids = _initial_centroids(x, k, seed, init, init_sample)
    return (_lloyd_xla if jit_compile else _lloyd_graph)(x, centroids, k, iters, seed, chunk, empty)


@tf.function(reduce_retracing=True)
def _initial_centroids(x, k, seed, init, init_sample):
    x = tf.cast(x, tf.float32)
    n = tf.shape(x)[0]
    if init == "kmeans++":
        # Seeding is k sequential passes: over a random sample of init_sample points per cluster
        # (all points when there are fewer) it costs what a few Lloyd iterations do.
        sample = tf.random.experimental.stateless_shuffle(tf.range(n), seed=[seed, 2])[:init_sample * k]
        return _kmeans_pp(tf.gather(x, sample), k, seed, trials=2 + int(math.log(k)))
    order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=[seed, 1])
    return tf.gather(x, order[:k])


def _lloyd(x, centroids, k, iters, seed, chunk, empty):
    x = tf.cast(x, tf.float32)
    n = tf.shape(x)[0]

    def step(i, centroids):
        best, sim = _assign(x, centroids, chunk)
        sums = tf.math.unsorted_segment_sum(x, best, k)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(sim), best, k)
        means = tf.where((counts > 0)[:, None], tf.math.l2_normalize(sums, axis=1), centroids)
        if empty == "split":
            return i + 1, _split_into_empty(means, counts, seed, i)
        return i + 1, _reseed_farthest(means, counts, x, sim, k, n)

    _, centroids = tf.while_loop(lambda i, _: i < iters, step, (0, centroids))
    best, sim = _assign(x, centroids, chunk)
    return centroids, best, tf.reduce_sum(2.0 - 2.0 * sim)


_lloyd_graph = tf.function(_lloyd, reduce_retracing=True)
_lloyd_xla = tf.function(_lloyd, reduce_retracing=True, jit_compile=True)

"""k-means benchmark: cmsf_tf.clustering.spherical_kmeans against faiss-cpu (when installed) on the
same synthetic clustered unit vectors, same iterations, one run each; time and inertia.

    python tools/bench_kmeans.py [--n=200000 --d=128 --k=2000 --iters=20]

Inertia is reported as sum of squared Euclidean distances to the cluster means of each method's own
assignment (the objective both minimise up to normalisation), so the two are comparable.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clustered(n, d, true_k, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(true_k, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, true_k, n)] + 0.3 / np.sqrt(d) * rng.normal(size=(n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def inertia(x, assignments, k):
    counts = np.bincount(assignments, minlength=k).astype(np.float32)
    sums = np.zeros((k, x.shape[1]), np.float32)
    np.add.at(sums, assignments, x)
    means = sums / np.maximum(counts, 1)[:, None]
    return float(((x - means[assignments]) ** 2).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--init", default="random", choices=["random", "kmeans++"])
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cmsf_tf import clustering

    x = clustered(args.n, args.d, args.k)
    clustering.spherical_kmeans(x[:1000], 10, iters=1)  # trace once outside the timing
    start = time.perf_counter()
    _, ours, _ = clustering.spherical_kmeans(x, args.k, iters=args.iters, seed=0, init=args.init,
                                                 chunk=args.chunk)
    ours_s = time.perf_counter() - start
    ours_inertia = inertia(x, ours.numpy(), args.k)
    print(f"{args.n} x {args.d} -> {args.k} clusters, {args.iters} iterations, {args.init} init (faiss: random):")
    print(f"  cmsf_tf spherical_kmeans  {ours_s:7.1f} s   inertia {ours_inertia:.1f}")
    try:
        import faiss
    except ImportError:
        print("  faiss-cpu not installed: no comparison (pip install faiss-cpu)")
        return
    km = faiss.Kmeans(args.d, args.k, niter=args.iters, spherical=True, seed=0, verbose=False)
    start = time.perf_counter()
    km.train(x)
    _, theirs = km.index.search(x, 1)
    faiss_s = time.perf_counter() - start
    faiss_inertia = inertia(x, theirs[:, 0], args.k)
    print(f"  faiss Kmeans (spherical)  {faiss_s:7.1f} s   inertia {faiss_inertia:.1f}")
    print(f"  time ratio {ours_s / faiss_s:.2f}x (target <= 1.5x), inertia ratio {ours_inertia / faiss_inertia:.4f} "
          "(target <= 1.01)")


if __name__ == "__main__":
    main()

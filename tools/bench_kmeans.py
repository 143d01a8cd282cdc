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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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


SETTINGS = {  # name -> spherical_kmeans arguments; the first is the library's default
    "random + split (default)": dict(init="random", empty="split"),
    "random + farthest": dict(init="random", empty="farthest"),
    "kmeans++ + split": dict(init="kmeans++", empty="split"),
    # The default compiled with XLA, as a --jit_compile training run clusters (timed after one untimed run
    # of the same size: XLA compiles once per pool size, i.e. once per training run in the steady state).
    "random + split (XLA)": dict(init="random", empty="split", jit_compile=True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS to run")
    parser.add_argument("--json", default="", help="append the JSON line to this file")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import benchlib

    from cmsf_tf import clustering

    x = clustered(args.n, args.d, args.k)
    clustering.spherical_kmeans(x[:1000], 10, iters=1)  # trace once outside the timing
    rows = []
    # multiply-adds of the assignments (iters + the final one), the whole cost at scale
    flops = 2.0 * (args.iters + 1) * args.n * args.k * args.d
    for name in args.settings.split(","):
        if SETTINGS[name].get("jit_compile"):
            clustering.spherical_kmeans(x, args.k, iters=args.iters, seed=0, chunk=args.chunk, **SETTINGS[name])
        start = time.perf_counter()
        _, ours, _ = clustering.spherical_kmeans(x, args.k, iters=args.iters, seed=0, chunk=args.chunk,
                                                 **SETTINGS[name])
        seconds = time.perf_counter() - start
        rows.append({"method": f"cmsf_tf {name}", "seconds": round(seconds, 4), "gflop_per_s": round(flops / seconds / 1e9, 3),
                     "inertia": round(inertia(x, ours.numpy(), args.k), 1)})
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss-cpu not installed: no comparison (pip install faiss-cpu)")
    if faiss is not None:
        km = faiss.Kmeans(args.d, args.k, niter=args.iters, spherical=True, seed=0, verbose=False)
        start = time.perf_counter()
        km.train(x)
        _, theirs = km.index.search(x, 1)
        reference = {"method": f"faiss {faiss.__version__} Kmeans(spherical), random init",
                     "seconds": round(time.perf_counter() - start, 2), "inertia": round(inertia(x, theirs[:, 0], args.k), 1)}
        for row in rows:
            row["time_vs_faiss"] = round(row["seconds"] / reference["seconds"], 3)
            row["inertia_vs_faiss"] = round(row["inertia"] / reference["inertia"], 4)
            row["meets_target"] = row["time_vs_faiss"] <= 1.5 and row["inertia_vs_faiss"] <= 1.01
        rows.append(reference)
    print(f"{args.n} x {args.d} -> {args.k} clusters, {args.iters} iterations (targets: inertia <= 1.01x faiss, "
          "time <= 1.5x):")
    for row in rows:
        extra = (f"   time {row['time_vs_faiss']:.2f}x, inertia {row['inertia_vs_faiss']:.4f}x"
                 if "time_vs_faiss" in row else "")
        rate = f"   {row['gflop_per_s']:6.1f} GFLOP/s" if "gflop_per_s" in row else ""
        print(f"  {row['method']:<48} {row['seconds']:7.1f} s{rate}   inertia {row['inertia']:,.1f}{extra}")
    benchlib.emit_json("bench_kmeans", rows, args.json, settings={k: v for k, v in vars(args).items() if k != "json"})


if __name__ == "__main__":
    main()

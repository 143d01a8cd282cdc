"""Benchmark: 20-NN classification with ScaNN, exact (brute force) vs approx (tree + AH + re-ranking).

    python tools/bench_knn.py                       # 1,000,000 x 512 index, 10,000 queries
    python tools/bench_knn.py --n=200000 --queries=2000

Synthetic clustered features (unit vectors around --classes centres, noise --spread) made here, so the
benchmark needs no data. Reports index build and search time of each mode, the speed-up of approx
search, and the agreement of the two modes' predicted labels (and each one's accuracy). Targets:
approx >= 10x faster than exact with >= 99.5% agreement.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def clustered(n, dim, classes, spread, seed, sub=0.2, chunk=100_000):
    """float32 [n, dim] unit vectors around fixed class centres, int32 [n] labels. Chunked: 1M x 512
    floats are 2 GB, and the float64 intermediates of a one-shot draw would triple that."""
    # Classes in groups of ten around shared super-class centres: neighbouring classes overlap, as the
    # classes of real features do (independent random centres in 512-d would be trivially separable).
    g = np.random.default_rng(1234)
    supers = g.normal(size=(-(-classes // 10), dim))
    centres = (supers[np.arange(classes) // 10] + sub * g.normal(size=(classes, dim))).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    x = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        block = centres[labels[i:i + chunk]] + spread * rng.standard_normal((len(labels[i:i + chunk]), dim), np.float32)
        x[i:i + chunk] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0,
                        help="noise std per dimension (1.0: exact 20-NN top-1 ~80%%, like real features)")
    parser.add_argument("--sweep", default="", help="also search the approx index with these "
                        "leaves_to_search:reorder pairs, e.g. 100:200,150:500 (the index is built once)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--json", default="", help="append the one-line JSON record to this file")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cmsf_tf.eval import knn

    started = time.time()
    index, index_labels = clustered(args.n, args.dim, args.classes, args.spread, seed=0)
    queries, query_labels = clustered(args.queries, args.dim, args.classes, args.spread, seed=1)
    print(f"data: {args.n} x {args.dim} index, {args.queries} queries, {args.classes} classes "
          f"({time.time() - started:.1f} s to make)", flush=True)

    exact, build_s = knn.build_searcher(index, args.k, "exact")
    t = time.time()
    exact_pred = knn.majority_vote(index_labels[knn.search_with(exact, queries, args.k)[0]], args.classes)
    exact_s = time.time() - t
    del exact
    print(f" exact: build {build_s:7.2f} s, search {exact_s:7.2f} s ({args.queries / exact_s:,.0f} queries/s), "
          f"20-NN top-1 {100 * np.mean(exact_pred == query_labels):.2f}%", flush=True)

    approx, approx_build_s = knn.build_searcher(index, args.k, "approx")
    defaults = knn.approx_settings(args.n, args.k)
    settings = [(defaults.get("num_leaves_to_search"), defaults["reorder"])]
    settings += [tuple(int(v) for v in pair.split(":")) for pair in args.sweep.split(",") if pair]
    rows = []
    for leaves, reorder in settings:
        t = time.time()
        idx = knn.search_with(approx, queries, args.k, leaves_to_search=leaves, reorder=reorder)[0]
        search_s = time.time() - t
        pred = knn.majority_vote(index_labels[idx], args.classes)
        rows.append({"leaves_to_search": leaves, "reorder": reorder, "search_s": round(search_s, 2),
                     "speedup": round(exact_s / search_s, 1), "label_agreement": float(np.mean(pred == exact_pred)),
                     "top1": float(np.mean(pred == query_labels))})
        r = rows[-1]
        print(f"approx (leaves {leaves}/{defaults.get('num_leaves')}, reorder {reorder}): search {search_s:6.2f} s, "
              f"{r['speedup']:.1f}x faster, labels agree {100 * r['label_agreement']:.2f}%, "
              f"top-1 {100 * r['top1']:.2f}%", flush=True)
    summary = {"n": args.n, "dim": args.dim, "queries": args.queries, "classes": args.classes, "spread": args.spread,
               "exact": {"build_s": round(build_s, 2), "search_s": round(exact_s, 2),
                         "top1": float(np.mean(exact_pred == query_labels))},
               "approx": {"build_s": round(approx_build_s, 2), "settings": defaults, "runs": rows}}
    r = rows[0]
    print(f"default approx search: {r['speedup']:.1f}x faster than exact (target >= 10x), predicted labels agree "
          f"on {100 * r['label_agreement']:.2f}% of queries (target >= 99.5%)")
    print(json.dumps(summary, indent=2))
    import benchlib

    table = [{"search": "exact (brute force)", "search_s": round(exact_s, 2), "speedup": 1.0,
              "top1": summary["exact"]["top1"]}]
    table += [{"search": f"approx, {r['leaves_to_search']} leaves, re-rank {r['reorder']}"
               + (" (defaults)" if i == 0 else ""), **{k: r[k] for k in ("search_s", "speedup", "label_agreement", "top1")}}
              for i, r in enumerate(rows)]
    benchlib.emit_json("bench_knn", table, args.json,
                       settings={k: v for k, v in summary.items() if k not in ("exact", "approx")},
                       build_s={"exact": summary["exact"]["build_s"], "approx": summary["approx"]["build_s"]})


if __name__ == "__main__":
    main()

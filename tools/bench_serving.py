"""Benchmark: the exported k-NN classifier served by stock TensorFlow, against the backbone alone.

    python tools/bench_serving.py                                   # 60,000 and 1,281,167 rows, batches 1, 64
    python tools/bench_serving.py --sizes=60000 --calls=10          # quick
    python tools/bench_serving.py --json=bench/results_serving.json --doc=bench/serving.md

For each index size the tool writes a real export (cmsf_tf.export.write_saved_model, exact search: the
index in a variable, searched in chunks of 65,536 rows), loads it with tf.saved_model.load in a fresh
process that imports TensorFlow only (the tool stops if scann or cmsf_tf got loaded there) and times the
signatures a server calls: `serve` (the backbone alone: uint8 images -> unit features), `classify`
(backbone + search + vote) and `neighbours`, at batches of 1 and 64. The network is the demo recipe's
(ResNet-18 small-image stem, width 16, 28 px; --arch/--width/--image_size to change it) with its initial
weights: the cost of a call does not depend on what the weights hold. The index rows are synthetic unit
vectors in the network's feature dimension (60,000 = Fashion-MNIST's training set; 1,281,167 = ImageNet's),
the labels drawn from --classes classes.

The calls of one index alternate in rounds (benchlib.alternate), so a slow phase of the machine hits
every signature alike. Reported per case: p50 and p99 latency over --calls calls (p99 of fewer than 100
calls is the slowest but one or two), throughput (images per second at p50), and the ratios the targets
are stated in: classify / serve at batch 64 (target: at most 3 at 60,000 rows) and the search time
(classify - serve) at 1,281,167 rows over 60,000 rows, against the index-size ratio 21.35 (linear).
"""

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIGNATURES = ("serve", "classify", "neighbours")


def percentile_ms(seconds, q):
    return 1000.0 * float(np.percentile(np.asarray(seconds), q, method="higher"))


def synthetic_encoder(arch, width, image_size, seed=0):
    """An eval.encoder.Encoder over a freshly initialised backbone (what export needs from a checkpoint)."""
    import keras

    from cmsf_tf.eval.encoder import Encoder
    from cmsf_tf.models import backbones

    keras.utils.set_random_seed(seed)
    network = backbones.build_backbone(arch, image_size, 3, width, name="online_backbone")
    dim = int(network.output_shape[-1])
    info = {"kind": "synthetic", "path": "(initial weights)", "step": 0, "encoder": "online", "arch": arch,
            "width": width}
    return Encoder(features=network, image_size=image_size, feature_dim=dim, info=info, backbone=network)


def synthetic_index(n, dim, classes, k, dtype="float32", seed=0, chunk=200_000):
    """IndexData of `n` unit rows (float32, drawn in chunks to bound the float64 temporaries)."""
    from cmsf_tf.export import IndexData

    rng = np.random.default_rng(seed)
    features = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - i), dim), np.float32)
        features[i:i + chunk] = block / np.linalg.norm(block, axis=1, keepdims=True)
    labels = rng.integers(0, classes, n).astype(np.int32)
    return IndexData(features, labels, None, classes, k, "majority", 0.07, "exact", "all", dtype)


def measure(export_dir, batches, image_size, calls):
    """{(signature, batch): [seconds per call]} of the loaded export, in alternating rounds, and the modules
    of scann or cmsf_tf the measuring process had loaded (run it in a process of its own: none)."""
    import tensorflow as tf

    from benchlib import alternate

    loaded = tf.saved_model.load(export_dir)
    rng = np.random.default_rng(1)
    cases = {}
    for batch in batches:
        images = tf.constant(rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8))
        for name in SIGNATURES:
            fn = loaded.signatures[name]
            # .numpy() on every output: the call is done when its answer is in host memory, as a server's.
            cases[(name, batch)] = (lambda fn=fn, images=images: [v.numpy() for v in fn(images=images).values()])
    times = alternate(cases, calls)
    return times, sorted(m for m in sys.modules if m.split(".")[0] in ("scann", "cmsf_tf"))


def measure_in_a_fresh_process(*args):
    """measure() in a spawned process, which imports TensorFlow and this file's helpers only: the export is
    timed as a server that has only TensorFlow would load and run it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def rows_of(size, times):
    from benchlib import median_ms

    rows = []
    for (name, batch), seconds in times.items():
        p50 = median_ms(seconds)
        rows.append({"index": size, "signature": name, "batch": batch, "calls": len(seconds),
                     "p50_ms": round(p50, 2), "p99_ms": round(percentile_ms(seconds, 99), 2),
                     "images_per_s": round(batch / (p50 / 1000.0), 1)})
    return rows


def summary(rows, sizes):
    """The ratios the targets are stated in."""
    p50 = {(r["index"], r["signature"], r["batch"]): r["p50_ms"] for r in rows}
    out = {}
    batch = max(r["batch"] for r in rows)
    for size in sizes:
        if (size, "classify", batch) in p50:
            out[f"classify_over_serve_b{batch}_{size}"] = round(p50[size, "classify", batch] / p50[size, "serve", batch], 2)
    small, large = min(sizes), max(sizes)
    if small != large:
        search = {s: p50[s, "classify", batch] - p50[s, "serve", batch] for s in (small, large)}
        out[f"search_ms_b{batch}"] = {str(s): round(v, 2) for s, v in search.items()}
        out["search_ratio"] = round(search[large] / max(search[small], 1e-9), 2)
        out["size_ratio"] = round(large / small, 2)
    return out


def write_doc(path, record):
    """A markdown page of one run: the table and the ratios against their targets."""
    s = record["summary"]
    lines = [
        "# Serving the exported k-NN classifier",
        "",
        "Generated by `python tools/bench_serving.py " + record["command"] + "` "
        f"on {record['machine']['cpu']} ({record['machine']['cores']} cores), {record['time']}; "
        f"TensorFlow {record['versions'].get('tensorflow', '?')}. Network: {record['network']} "
        f"({record['feature_dim']}-d features), exact search over a {record['index_dtype']} index in a variable, k = {record['k']}, "
        "loaded with `tf.saved_model.load` in a process that imports TensorFlow only (checked: no scann, "
        "no cmsf_tf). Latencies are per call, answers in host memory.",
        "",
        "| index rows | signature | batch | p50 ms | p99 ms | images/s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        lines.append(f"| {r['index']:,} | {r['signature']} | {r['batch']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['images_per_s']:,.0f} |")
    lines.append("")
    for key, value in s.items():
        if key.startswith("classify_over_serve"):
            size = key.rsplit("_", 1)[1]
            lines.append(f"- classify / serve at batch {key.split('_b')[1].split('_')[0]}, {int(size):,} rows: "
                         f"**{value}×**" + (" (target ≤ 3×)" if int(size) == 60000 else ""))
    if "search_ratio" in s:
        searched = next(v for k, v in s.items() if k.startswith("search_ms"))
        lines.append(f"- search time (classify − serve, batch {max(r['batch'] for r in record['rows'])}) "
                     + " → ".join(f"{float(ms):.1f} ms at {int(n):,} rows" for n, ms in searched.items())
                     + f": {s['search_ratio']}× for {s['size_ratio']}× the rows (linear: the two ratios agree).")
    lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="60000,1281167", help="index rows, comma-separated")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per signature and batch")
    parser.add_argument("--arch", default="resnet18_small")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--index_dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default="", help="append the one-line JSON record to this file")
    parser.add_argument("--doc", default="", help="write the markdown page of this run here")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error("--sizes and --batches are comma-separated integers")
    if min(sizes) < args.k or min(batches) < 1 or args.calls < 1:
        parser.error(f"every index needs at least --k={args.k} rows, every batch an image, --calls at least 1")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchlib import emit_json, versions

    from cmsf_tf.export import write_saved_model

    encoder = synthetic_encoder(args.arch, args.width, args.image_size)
    rows = []
    for size in sizes:
        export_dir = tempfile.mkdtemp(prefix="cmsf_bench_serving_")
        try:
            write_saved_model(encoder, os.path.join(export_dir, "model"),
                              synthetic_index(size, encoder.feature_dim, args.classes, args.k, args.index_dtype))
            times, foreign = measure_in_a_fresh_process(os.path.join(export_dir, "model"), batches, args.image_size,
                                                        args.calls)
            if foreign:
                sys.exit(f"bench_serving: the serving process loaded {', '.join(foreign)}: not stock TensorFlow")
            found = rows_of(size, times)
        finally:
            shutil.rmtree(export_dir, ignore_errors=True)
        for r in found:
            print(f"{r['index']:>9,} rows  {r['signature']:<10} batch {r['batch']:>3}: p50 {r['p50_ms']:8.1f} ms  "
                  f"p99 {r['p99_ms']:8.1f} ms  {r['images_per_s']:9.0f} images/s", flush=True)
        rows += found
    command = " ".join(a for a in sys.argv[1:] if not a.startswith(("--json", "--doc")))
    record = emit_json("bench_serving", rows, args.json, command=command, versions=versions("tensorflow", "keras"),
                       network=f"{args.arch} width {args.width} at {args.image_size} px",
                       feature_dim=encoder.feature_dim, k=args.k, index_dtype=args.index_dtype,
                       served_by="a process with TensorFlow only (no scann, no cmsf_tf)",
                       summary=summary(rows, sizes))
    if args.doc:
        write_doc(args.doc, record)


if __name__ == "__main__":
    main()

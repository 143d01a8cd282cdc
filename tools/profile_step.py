"""Where the train step's time goes: the TensorFlow profiler over a few steps of one method, summed by op type
and by part of the step (target / online network and its gradient / neighbour search / bank and pool writes /
optimizer / EMA), from the trace's TF-op events.

    python tools/profile_step.py [--method=msf --net=demo --steps=5] [--json=bench/results.json]

Same fixed batch and model as tools/bench_step.py. Kernel times are summed over the executor's threads, so
their total exceeds the wall time when ops run in parallel; the shares are of that total.
"""

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import bench_step  # noqa: E402

def part_of(name):
    """Part of the step an op belongs to, from the name scopes Keras gives the layers and our ops' types."""
    lower = name.lower()
    if "target_backbone" in lower or "target_projector" in lower:
        return "target network"
    if any(s in lower for s in ("online_backbone", "online_projector", "predictor", "classifier", "gradient")):
        return "online network + gradient"
    if "scatter" in lower:
        return "bank / pool writes"
    if any(s in lower for s in ("topk", "top_k", "batchmatmul", "matmul", "gather", "einsum")):
        return "neighbour search + loss"
    if any(s in lower for s in ("resourceapply", "sgd", "assignaddvariableop", "assignsubvariableop")):
        return "optimizer / counters"
    return "other (EMA, metrics, casts)"


def trace_events(logdir):
    """[(op name, op type, microseconds)] of the TF-op events in the profiler's xplane files."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    events = []
    for path in glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    op_name, _, op_type = name.rpartition(":")
                    op_type = op_type.strip()
                    # Only kernel events "scope/op:OpType"; executor, function and step events nest them.
                    if not op_name or " " in op_name or "::" in name or op_type.startswith("__inference"):
                        continue
                    events.append((op_name, op_type, event.duration_ps / 1e6))
    return events


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="msf", choices=bench_step.METHODS)
    parser.add_argument("--net", default="demo", choices=sorted(bench_step.NETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="op types listed")
    parser.add_argument("--json", default="", help="append the JSON line to this file")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    run = bench_step.tf_step(args.method, bench_step.NETS[args.net], {})
    run(2)  # tracing and warm-up
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        run(args.steps)
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
        tf.profiler.experimental.stop()
        events = trace_events(logdir)
    if not events:
        raise SystemExit("error: the profiler recorded no TF-op events")
    by_type, by_part = collections.Counter(), collections.Counter()
    for op_name, op_type, us in events:
        by_type[op_type] += us
        by_part[part_of(f"{op_name}/{op_type}")] += us
    total = sum(by_type.values())
    print(f"{args.method} on the {args.net} network: {wall_ms:.1f} ms per step (wall, under the profiler), "
          f"{total / 1000 / args.steps:.1f} ms of kernels per step summed over threads")
    print("by part of the step:")
    for part, us in by_part.most_common():
        print(f"  {part:<34} {us / 1000 / args.steps:8.1f} ms  {100 * us / total:5.1f}%")
    print(f"by op type (top {args.top}):")
    for op_type, us in by_type.most_common(args.top):
        print(f"  {op_type:<34} {us / 1000 / args.steps:8.1f} ms  {100 * us / total:5.1f}%")
    rows = [{"part": part, "ms_per_step": round(us / 1000 / args.steps, 2), "share": round(us / total, 4)}
            for part, us in by_part.most_common()]
    benchlib.emit_json("profile_step", rows, args.json, method=args.method, net=args.net, steps=args.steps,
                       wall_ms=round(wall_ms, 1),
                       op_types=[{"op": t, "ms_per_step": round(us / 1000 / args.steps, 2), "share": round(us / total, 4)}
                                 for t, us in by_type.most_common(args.top)])


if __name__ == "__main__":
    main()

"""Train-step benchmark: the full step of every method (target forward, online forward + backward,
neighbour search, bank write, optimizer, EMA) on fixed in-memory batches (no input pipeline), for the
demo network and for ResNet-50, against the same step written in PyTorch the way the authors' code
writes it (tools/torch_reference.py) when torch is installed, timed alternately in one run.

    python tools/bench_step.py                          # demo network and ResNet-50, every method
    python tools/bench_step.py --nets=demo --methods=msf,byol
    python tools/bench_step.py --quick                  # tiny sizes (smoke test)

Each (method, framework) runs in its own process (so each has its own peak RSS and nothing one
framework leaves behind slows the other); the processes of one method take turns: round r runs
--steps steps of cmsf_tf, then of PyTorch, and so on (--alternate_methods: every chosen method's processes
take turns, for ratios to BYOL that a slow phase of a shared machine cannot skew). Reported: median ms/step over the rounds (min-max),
images/s, the ratio to BYOL's step of the same framework, the ratio to PyTorch, the peak RSS.
cmsf_tf's step is Keras' train function, the one model.fit calls every step.

    python tools/bench_step.py --nets=demo --methods=msf --processes=20 --intra_op=2

--processes=N measures the spread between processes rather than within one: N times over, a fresh process
per framework (the frameworks alternating), each timed over its own rounds. Every process's ms/step is
reported, with the share of the machine's CPU that other processes used while it was timed (`foreign`,
from /proc/stat less the process's own CPU time: 0 on a quiet machine, 0.5 when one of two cores was
busy elsewhere), so a slow process shows whether the machine or the process was slow.
"""

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

METHODS = ("byol", "msf", "cmsf_2q", "cmsf_km", "cmsf_sup", "cmsf_pseudo", "xent")
# net -> the model and data sizes of the step
NETS = {
    "demo": dict(arch="resnet18_small", width=16, image_size=28, batch=256, bank_size=8192, num_images=60000,
                 num_classes=10, num_clusters=500),
    "resnet50": dict(arch="resnet50", width=64, image_size=224, batch=16, bank_size=128000, num_images=128000,
                     num_classes=1000, num_clusters=50000),
    # --quick: the smallest step that still runs every part
    "tiny": dict(arch="resnet18_small", width=4, image_size=16, batch=16, bank_size=256, num_images=512,
                 num_classes=10, num_clusters=20),
}


def fixed_batch(net, seed=0):
    """NumPy arrays of one batch as the pipeline yields it (uint8 views, which the step converts and
    normalises; labels, indices)."""
    rng = np.random.default_rng(seed)
    b, s = net["batch"], net["image_size"]
    images = lambda: rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)  # noqa: E731
    labels = rng.integers(0, net["num_classes"], b).astype(np.int32)
    return {"weak": images(), "strong": images(), "third": images(), "label": labels, "true_label": labels.copy(),
            "index": rng.choice(net["num_images"], b, replace=False).astype(np.int64),
            "is_labelled": rng.random(b) < 0.1}


def configure_tf_threads(threads):
    import tensorflow as tf

    if threads.get("intra"):
        tf.config.threading.set_intra_op_parallelism_threads(threads["intra"])
    if threads.get("inter"):
        tf.config.threading.set_inter_op_parallelism_threads(threads["inter"])


def tf_step(method, net, threads):
    """A callable running `steps` cmsf_tf train steps, as model.fit does."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    configure_tf_threads(threads)
    import keras
    import tensorflow as tf

    from cmsf_tf import config, train

    cfg = config.make(method=method, arch=net["arch"], width=net["width"], image_size=net["image_size"],
                      batch_size=net["batch"], bank_size=net["bank_size"], num_clusters=net["num_clusters"],
                      topk=1 if method == "byol" else 5, labelled_cache_size=net["bank_size"],
                      label_split="percent:10" if method == "cmsf_pseudo" else "")
    model = train.build_model(cfg, sync_bn=False, num_images=net["num_images"], num_classes=net["num_classes"])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=bool(threads.get("jit")))
    if method == "cmsf_km":  # clusters as after the first epoch end, so the constraint is active
        rng = np.random.default_rng(1)
        model.cluster_ids.assign(rng.integers(0, net["num_clusters"], net["num_images"]).astype(np.int32))
    unused = ({"third"} if method != "cmsf_2q" else set()) | ({"strong"} if method == "xent" else set())
    batch = {k: v for k, v in fixed_batch(net).items() if k not in unused}
    if threads.get("multi_crop"):  # (n, size): the small crops the pipeline would add, [B, n, s, s, 3] uint8
        n, size = threads["multi_crop"]
        batch["small"] = np.random.default_rng(2).integers(0, 256, (net["batch"], n, size, size, 3), dtype=np.uint8)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    model.make_train_function()
    train_function = model.train_function

    def run(steps):
        for _ in range(steps):
            logs = train_function(iterator)
        float(np.asarray(logs["loss"]).ravel()[0])  # wait for the step

    return run


def torch_step(method, net, threads):
    import torch

    import torch_reference

    torch.set_num_threads(threads.get("intra") or benchlib.machine()["cores"])
    torch.manual_seed(0)
    step = torch_reference.make_step(method, net["arch"], net["width"], net["bank_size"], net["num_images"],
                                     net["num_classes"], topk=5, num_clusters=net["num_clusters"])
    # The authors' loader hands the step normalised float32 NCHW images (ToTensor + Normalize on the CPU).
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    batch = {k: torch.from_numpy(np.ascontiguousarray(((v / np.float32(255) - mean) / std).astype(np.float32)
                                                      .transpose(0, 3, 1, 2)) if v.ndim == 4 else v)
             for k, v in fixed_batch(net).items()}
    batch["label"], batch["index"] = batch["label"].long(), batch["index"].long()

    def run(steps):
        for _ in range(steps):
            step(batch)

    return run


# What each framework name runs: cmsf_tf's step as --jit_compile says, the same step compiled with XLA
# (--compare_xla), or the PyTorch reference.
XLA = "cmsf_tf_xla"
MULTI_CROP = "cmsf_tf_multi_crop"  # cmsf_tf's step with --compare_multi_crop's small crops in the batch
NO_ONEDNN = "cmsf_tf_no_onednn"  # cmsf_tf's step on TensorFlow's Eigen CPU kernels (--compare_onednn)
# each variant's row: the key of its ratio to the cmsf_tf row's step
VARIANT_RATIOS = {XLA: "vs_no_xla", MULTI_CROP: "vs_single_crop", NO_ONEDNN: "vs_onednn"}


def framework_width(frameworks):
    """The width of the printed framework column: 11 as it always was, wider for a longer name (cmsf_tf_no_onednn)."""
    return max(11, *map(len, frameworks))


def machine_busy_seconds():
    """CPU seconds the whole machine has spent busy (every core, every process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest time is inside user


def own_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def foreign_share(busy_before, busy_after, own_seconds, wall_seconds, cores):
    """The share of the machine's cores busy with other processes' work (or steal) during a timed stretch."""
    if busy_before is None or busy_after is None or wall_seconds <= 0:
        return None
    return max(0.0, (busy_after - busy_before - own_seconds) / (wall_seconds * cores))


def worker(conn, framework, method, net, threads):
    """A process holding one step: answers ("run", steps) with (seconds per step, foreign CPU share),
    ("rss",) with peak RSS in MB."""
    try:  # (spawn re-runs this module's top level in the child, so sys.path already holds ROOT and tools/)
        if framework == XLA:
            run = tf_step(method, net, dict(threads, jit=True))
        elif framework == MULTI_CROP:
            run = tf_step(method, net, dict(threads, multi_crop=net["multi_crop"]))
        else:
            if threads.get("onednn") and framework in ("cmsf_tf", NO_ONEDNN):  # --compare_onednn: off vs on; read
                os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0" if framework == NO_ONEDNN else "1"  # when TensorFlow starts
            run = (torch_step if framework == "pytorch" else tf_step)(method, net, threads)
        run(1)  # tracing, allocation, warm-up
        cores = benchlib.machine()["cores"]
        info = {}
        if framework != "pytorch":
            from cmsf_tf import distribute

            info["onednn"] = distribute.onednn_on()
        conn.send(("ready", info))
        while True:
            msg = conn.recv()
            if msg[0] == "run":
                busy, own, start = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
                run(msg[1])
                wall = time.perf_counter() - start
                foreign = foreign_share(busy, machine_busy_seconds(), own_cpu_seconds() - own, wall, cores)
                conn.send(("time", (wall / msg[1], foreign)))
            elif msg[0] == "rss":
                conn.send(("rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))
            else:
                return
    except Exception as e:  # noqa: BLE001 - reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


def busy_loop(stop):
    """Keeps one core busy until `stop` is set: the load of another program on a shared machine."""
    while not stop.is_set():
        sum(i * i for i in range(10_000))


class BusyCores:
    """`n` processes each spinning on one core while the block runs (--busy_cores)."""

    def __init__(self, n):
        self.n, self.procs = n, []

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.procs = [ctx.Process(target=busy_loop, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc):
        if self.procs:
            self.stop.set()
            for p in self.procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
        return False


def measure(cases, net, rounds, steps, threads):
    """{(framework, method): {ms, min_ms, max_ms, foreign, rss_mb} or {error}}: one process per case, all
    alive at once, taking turns round by round (one process works at a time). `foreign`: the largest share
    of the machine's CPU that other processes took during one of the case's rounds."""
    ctx = multiprocessing.get_context("spawn")
    procs = {}
    for fw, method in cases:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(child, fw, method, net, threads), daemon=True)
        p.start()
        procs[(fw, method)] = (p, parent)
    results = {}
    try:
        ready, info = {}, {}
        for case, (p, conn) in procs.items():
            kind, value = conn.recv()
            if kind == "error":
                results[case] = {"error": value}
            else:
                ready[case], info[case] = conn, value
        times = {case: [] for case in ready}
        foreign = {case: [] for case in ready}
        for _ in range(rounds):
            for case, conn in ready.items():
                conn.send(("run", steps))
                kind, value = conn.recv()
                if kind == "error":
                    raise RuntimeError(f"{case[0]} {case[1]}: {value}")
                times[case].append(value[0])
                if value[1] is not None:
                    foreign[case].append(value[1])
        for case, conn in ready.items():
            conn.send(("rss",))
            rss = conn.recv()[1]
            fastest, slowest = benchlib.spread_ms(times[case])
            results[case] = {"ms": benchlib.median_ms(times[case]), "min_ms": fastest, "max_ms": slowest,
                             "foreign": round(max(foreign[case]), 3) if foreign[case] else None, "rss_mb": rss,
                             **info[case]}
    finally:
        for p, conn in procs.values():
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="demo,resnet50", help=f"comma-separated: {', '.join(NETS)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=0, help="steps per round (0: 4 for demo, 1 for resnet50)")
    parser.add_argument("--resnet50_batch", type=int, default=NETS["resnet50"]["batch"])
    parser.add_argument("--intra_op", type=int, default=0, help="TF intra-op threads (0: TensorFlow's default)")
    parser.add_argument("--inter_op", type=int, default=0, help="TF inter-op threads (0: TensorFlow's default)")
    parser.add_argument("--jit_compile", action="store_true", help="compile cmsf_tf's step with XLA")
    parser.add_argument("--compare_xla", action="store_true",
                        help=f"also time cmsf_tf's step compiled with XLA ({XLA}), alternating with the others; "
                             "rows get its ratio to the step without XLA (vs_no_xla)")
    parser.add_argument("--compare_multi_crop", default="",
                        help="also time the step with small crops N:SIZE_DEMO:SIZE_RESNET50 per image "
                             f"(e.g. 6:14:96) ({MULTI_CROP}), alternating with the others; rows get its ratio to "
                             "the step without them (vs_single_crop)")
    parser.add_argument("--compare_onednn", action="store_true",
                        help=f"time the cmsf_tf row with TensorFlow's oneDNN CPU kernels on and also the step with them off "
                             f"({NO_ONEDNN}), alternating with the others; rows get its ratio to the step with them "
                             "on (vs_onednn) and record whether each process ran them (TensorFlow turns them on by "
                             "itself only on CPUs with AVX-512 VNNI/BF16 or AMX)")
    parser.add_argument("--alternate_methods", action="store_true",
                        help="keep every method's process alive and let all take turns round by round (for the "
                             "ratios to BYOL; needs the memory of all at once), instead of one method after another")
    parser.add_argument("--processes", type=int, default=0,
                        help="N fresh processes per framework, one after another (frameworks alternating): "
                             "every process's ms/step and the spread between processes (0: one process each)")
    parser.add_argument("--busy_cores", type=int, default=0,
                        help="with --processes: N busy-loop processes run beside the timed ones, to see what a "
                             "core taken by other work does to each framework's step (0: none)")
    benchlib.add_common_args(parser, quick_help="the tiny network, one round of one step")
    args = parser.parse_args(argv)
    if args.busy_cores and not args.processes:
        parser.error("--busy_cores needs --processes")
    if args.quick:
        args.nets, args.rounds, args.steps = "tiny", 1, 1
    return args


def steps_per_round(args, net_name):
    return args.steps or (4 if net_name == "demo" else 1)


def main(argv=None):
    args = parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # inherited by the workers
    NETS["resnet50"]["batch"] = args.resnet50_batch
    frameworks = (["cmsf_tf"] + ([XLA] if args.compare_xla else []) + ([MULTI_CROP] if args.compare_multi_crop else [])
                  + ([NO_ONEDNN] if args.compare_onednn else [])
                  + (["pytorch"] if benchlib.optional_torch(args.no_torch) else []))
    threads = {"intra": args.intra_op, "inter": args.inter_op, "jit": args.jit_compile, "onednn": args.compare_onednn}
    if args.compare_multi_crop:
        try:
            n, demo, r50 = (int(v) for v in args.compare_multi_crop.split(":"))
        except ValueError:
            sys.exit("bench_step: --compare_multi_crop is N:SIZE_DEMO:SIZE_RESNET50, e.g. 6:14:96")
        for name, size in (("demo", demo), ("resnet50", r50), ("tiny", 8)):
            NETS[name]["multi_crop"] = (n, size)
    if args.processes:
        return main_processes(args, frameworks, threads)
    rows = []
    fw_w = framework_width(frameworks)
    for net_name in args.nets.split(","):
        net = NETS[net_name]
        steps = steps_per_round(args, net_name)
        print(f"\n{net_name}: {net['arch']} width {net['width']}, {net['image_size']} px, batch {net['batch']}, "
              f"bank {net['bank_size']:,}; median of {args.rounds} rounds of {steps} step(s)")
        print(f"{'method':12s} {'framework':{fw_w}s} {'ms/step':>9s} {'(min-max)':>15s} {'img/s':>7s} {'vs byol':>8s} "
              f"{'vs torch':>9s} {'RSS MB':>7s}" + (f" {'vs no XLA':>9s}" if args.compare_xla else ""))
        byol = {}
        methods = args.methods.split(",")
        if args.alternate_methods:
            res = measure([(fw, m) for m in methods for fw in frameworks], net, args.rounds, steps, threads)
        for method in methods:
            if not args.alternate_methods:
                res = measure([(fw, method) for fw in frameworks], net, args.rounds, steps, threads)
            for fw in frameworks:
                r = res.get((fw, method), {"error": "no result"})
                row = {"net": net_name, "method": method, "framework": fw, **{k: (round(v, 2) if isinstance(v, float)
                                                                                   else v) for k, v in r.items()}}
                if "ms" in r:
                    row["images_per_s"] = round(net["batch"] / (r["ms"] / 1000), 1)
                    if method == "byol":
                        byol[fw] = r["ms"]
                    if fw in byol:
                        row["vs_byol"] = round(r["ms"] / byol[fw], 3)
                    if fw != "pytorch" and "ms" in res.get(("pytorch", method), {}):
                        row["vs_torch"] = round(r["ms"] / res[("pytorch", method)]["ms"], 3)
                    if fw in VARIANT_RATIOS and "ms" in res.get(("cmsf_tf", method), {}):
                        row[VARIANT_RATIOS[fw]] = round(r["ms"] / res[("cmsf_tf", method)]["ms"], 3)
                    if "vs_single_crop" in row:
                        n, size = net["multi_crop"][:2]
                        print(f"{'':12s} {'':{fw_w}s} with {n} small crops of {size} px: {row['vs_single_crop']:.3f}x "
                              "the step")
                    if "vs_onednn" in row:
                        print(f"{'':12s} {'':{fw_w}s} oneDNN off: {row['vs_onednn']:.3f}x the step with it on")
                    print(f"{method:12s} {fw:{fw_w}s} {r['ms']:9.1f} {r['min_ms']:7.1f}-{r['max_ms']:<7.1f} "
                          f"{row['images_per_s']:7.1f} {row.get('vs_byol', float('nan')):8.3f} "
                          f"{row.get('vs_torch', float('nan')):9.3f} {r['rss_mb']:7.0f}"
                          + (f" {row['vs_no_xla']:9.3f}" if "vs_no_xla" in row else ""))
                else:
                    print(f"{method:12s} {fw:{fw_w}s} failed: {r['error']}")
                rows.append(row)
    return benchlib.emit_json("bench_step", rows, args.json, settings=vars(args),
                              versions=benchlib.versions("tensorflow", "keras", "torch"))


def process_spread(per_process):
    """Summary of per-process ms/step: median, fastest, slowest, slowest / fastest, and how many processes
    were within 15% of the fastest."""
    ms = sorted(per_process)
    return {"ms": round(statistics.median(ms), 2), "min_ms": round(ms[0], 2), "max_ms": round(ms[-1], 2),
            "slowest_vs_fastest": round(ms[-1] / ms[0], 3),
            "within_15pct_of_fastest": sum(v <= 1.15 * ms[0] for v in ms)}


def main_processes(args, frameworks, threads):
    """--processes: a fresh process per (framework, repetition); rows with every process's ms/step."""
    rows = []
    fw_w = framework_width(frameworks)
    for net_name in args.nets.split(","):
        net = NETS[net_name]
        steps = steps_per_round(args, net_name)
        for method in args.methods.split(","):
            print(f"\n{net_name} {method}: {args.processes} fresh processes per framework, each the median of "
                  f"{args.rounds} rounds of {steps} step(s); foreign = others' share of the CPU while timed"
                  + (f"; {args.busy_cores} busy-loop process(es) beside" if args.busy_cores else ""))
            per = {fw: [] for fw in frameworks}
            for i in range(args.processes):
                with BusyCores(args.busy_cores):
                    res = measure([(fw, method) for fw in frameworks], net, args.rounds, steps, threads)
                cells = []
                for fw in frameworks:
                    r = res.get((fw, method), {"error": "no result"})
                    if "error" in r:
                        raise SystemExit(f"{fw} {method}: {r['error']}")
                    per[fw].append(r)
                    foreign = "?" if r["foreign"] is None else f"{r['foreign']:.2f}"
                    cells.append(f"{fw} {r['ms']:7.1f} ms (foreign {foreign})")
                print(f"  process {i + 1:2d}: " + ",  ".join(cells), flush=True)
            torch_median = process_spread([r["ms"] for r in per["pytorch"]])["ms"] if "pytorch" in per else None
            for fw in frameworks:
                ms = [r["ms"] for r in per[fw]]
                row = {"net": net_name, "method": method, "framework": fw, **process_spread(ms),
                       "processes": [round(v, 2) for v in ms], "foreign": [r["foreign"] for r in per[fw]],
                       "rss_mb": round(max(r["rss_mb"] for r in per[fw]), 1)}
                row["images_per_s"] = round(net["batch"] / (row["ms"] / 1000), 1)
                if torch_median and fw != "pytorch":
                    row["vs_torch"] = round(row["ms"] / torch_median, 3)
                print(f"{fw:{fw_w}s} median {row['ms']:.1f} ms ({row['min_ms']:.1f}-{row['max_ms']:.1f}), slowest / "
                      f"fastest {row['slowest_vs_fastest']:.3f}, {row['within_15pct_of_fastest']} of {len(ms)} "
                      f"within 15% of the fastest" + (f", median vs torch {row['vs_torch']:.3f}" if "vs_torch" in row
                                                       else ""))
                rows.append(row)
    return benchlib.emit_json("bench_step", rows, args.json, settings=vars(args),
                              versions=benchlib.versions("tensorflow", "keras", "torch"))


if __name__ == "__main__":
    main()

"""The paper's comparisons at small scale: every method on Fashion-MNIST, several seeds, one evaluation.

  python tools/reproduce_small.py            # the study: hours of CPU; run it again to continue it
  make reproduce                             # the same
  python tools/reproduce_small.py --study=multi_crop   # a side study (STUDIES): its rows, in its own directory
  python tools/reproduce_small.py --quick --out=/tmp/study --runs=/tmp/study/runs   # a few steps per method

Each row (a method, or a method under 25% label noise) trains with its recipe flags/fmnist_<...>.cfg and
the seeds of ROWS (a side study sets its own number), one worker process per run (a crash costs that run
only). A run trains through
cmsf_tf.train (resumable from its checkpoints: a killed study continues mid-run), then is evaluated the
same way as every other run, with the commands recorded in its JSON:

  knn_top1_k1 / knn_top1_k20   1-NN and 20-NN over the training set (the run's own final k-NN)
  linear_top1                  the paper's linear probe (40 epochs, SGD lr 0.01, drops at 15/30, best epoch)
                               on cached centre-crop features (--nolinear_augment: the crops cost 13 minutes
                               a run on 2 cores); linear_top1_last is the last epoch
  knn10_top1_k1                1-NN with the 10% labelled subset (percent:10, the run's seed) as the index
  semi10_top1                  the paper's semi-supervised protocol on the 10% subset (frozen backbone,
                               MLP head, 20 epochs, lr 0.001, best epoch), for the rows in SEMI_ROWS;
                               semi10_lr01_top1 the same with lr 0.01 (SEMI_LR_ROWS): 6,000 images make
                               24 steps an epoch, where the paper's 128,000 make 500

A finished run is written to <out>/<row>_s<seed>.json and skipped afterwards. After each run (so a study
stopped halfway leaves them current) <out>/summary.md (tables, the study's orderings read against the seed
spread, diagnostics) and <out>/summary.png (k-NN per epoch, final accuracy per seed, histograms of the
constrained neighbours' ranks) are rebuilt from every JSON there, for the whole study whatever --rows
says. Raw-pixel floors of the same protocols are in <out>/floors.json.
"""

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cmsf_tf import config  # noqa: E402  (no TensorFlow: config is absl and NumPy only)
from cmsf_tf.rundir import RunDir  # noqa: E402

config.quiet_tensorflow()  # before any TensorFlow import: no INFO lines, no CUDA error on a machine without a GPU

MULTI_CROP = "--multi_crop=6:12:0.05:0.2"
MULTI_CROP_EPOCHS = 11
# row: (flagfile, extra training flags, seeds). Three seeds for the rows whose ordering is the paper's
# main claim, two for the others.
ROWS = {
    "byol": ("flags/fmnist_byol.cfg", [], 2),
    "msf": ("flags/fmnist_msf.cfg", [], 3),
    "cmsf_2q": ("flags/fmnist_cmsf_2q.cfg", [], 3),
    "cmsf_km": ("flags/fmnist_cmsf_km.cfg", [], 3),
    # The authors' fill rule for constrained sets shorter than k (docs/parity.md): run beside cmsf_km in
    # results/fmnist/fill, which holds both rows trained by the same code.
    "cmsf_km_official": ("flags/fmnist_cmsf_km.cfg", ["--constraint_fill=official"], 2),
    # Multi-crop (docs/multi_crop.md): 6 small crops of 12 px (28 px x 96/224, ImageNet's proportion) covering
    # 0.05-0.2 of the image, the range below the main crops' (--crop_min_scale=0.2), as SwAV's small crops
    # cover the range below its large ones. Run in results/fmnist/multi_crop against the rows without, at
    # equal epochs (_mc) and at equal wall-clock (_mc_time: a step with the crops takes 1.86x as long on
    # this network, bench/results_multi_crop.json, so 11 epochs cost what 20 cost without).
    "msf_mc": ("flags/fmnist_msf.cfg", [MULTI_CROP], 2),
    "cmsf_2q_mc": ("flags/fmnist_cmsf_2q.cfg", [MULTI_CROP], 2),
    "cmsf_km_mc": ("flags/fmnist_cmsf_km.cfg", [MULTI_CROP], 2),
    "msf_mc_time": ("flags/fmnist_msf.cfg", [MULTI_CROP, f"--epochs={MULTI_CROP_EPOCHS}"], 2),
    "cmsf_2q_mc_time": ("flags/fmnist_cmsf_2q.cfg", [MULTI_CROP, f"--epochs={MULTI_CROP_EPOCHS}"], 2),
    "cmsf_km_mc_time": ("flags/fmnist_cmsf_km.cfg", [MULTI_CROP, f"--epochs={MULTI_CROP_EPOCHS}"], 2),
    "cmsf_pseudo": ("flags/fmnist_pseudo.cfg", [], 2),
    "cmsf_sup": ("flags/fmnist_sup.cfg", [], 2),
    "xent": ("flags/fmnist_xent.cfg", [], 2),
    "cmsf_sup_noise25": ("flags/fmnist_sup.cfg", ["--label_noise=25"], 2),
    "xent_noise25": ("flags/fmnist_xent.cfg", ["--label_noise=25"], 2),
}
METHOD_NAMES = {"msf": "MSF", "cmsf_2q": "CMSF-2Q", "cmsf_km": "CMSF-KM"}  # as the paper writes them
# Multi-crop rows: (row without, what is held equal) for each row with the small crops.
MULTI_CROP_ROWS = {f"{base}{tail}": (base, held) for base in METHOD_NAMES
                   for tail, held in (("_mc", "equal epochs"), ("_mc_time", "equal wall-clock"))}
SEMI_ROWS = ("byol", "msf", "cmsf_2q", "cmsf_km", "cmsf_pseudo", *MULTI_CROP_ROWS)
SEMI_LR_ROWS = ("msf", "cmsf_pseudo", "msf_mc", "msf_mc_time")
# The studies: which rows each runs (seeds: per row, 0 for each row's own number), where its results and
# run directories go, and its summary's title. Each has its own results directory, so a row run for one
# study never lands in another's tables.
STUDIES = {
    "main": dict(rows=("byol", "msf", "cmsf_2q", "cmsf_km", "cmsf_pseudo", "cmsf_sup", "xent", "cmsf_sup_noise25",
                       "xent_noise25"), seeds=0, out="results/fmnist", runs="runs/fmnist",
                 title="every method, several seeds, one evaluation"),
    "fill": dict(rows=("cmsf_km_official", "cmsf_km"), seeds=2, out="results/fmnist/fill", runs="runs/fmnist_fill",
                 title="CMSF-KM's fill rule, nearest against the authors'"),
    "multi_crop": dict(rows=("msf", "msf_mc", "msf_mc_time", "cmsf_2q", "cmsf_2q_mc", "cmsf_2q_mc_time", "cmsf_km_mc",
                             "cmsf_km_mc_time"), seeds=2, out="results/fmnist/multi_crop", runs="runs/fmnist_mc",
                       title="multi-crop, with and without, at equal epochs and at equal wall-clock"),
}
LABEL_SPLIT = "percent:10"
# The trainer's --topk when a run's command and flag files leave it unset.
TOPK_DEFAULT = next(s.default for s in config.TRAIN_SETTINGS if s.name == "topk")
# The bins of the training's rank histogram (methods.base.RankHistogram): the last holds every rank from 1,023.
RANK_BINS = 1024
# --quick: the tiny network and a few steps, for a smoke test of the whole tool.
QUICK_TRAIN = ["--width=4", "--batch_size=32", "--bank_size=128", "--topk=3", "--topk_prime=4", "--proj_hidden=32",
               "--proj_dim=16", "--epochs=2", "--steps_per_epoch=3", "--num_clusters=8", "--kmeans_iters=2",
               "--labelled_cache_size=64", "--pseudo_epochs=1", "--knn_every=1", "--knn_every_queries=200",
               "--knn_every_index=0", "--noknn_baselines"]
QUICK_EVAL = {"linear": ["--linear_epochs=2", "--linear_milestones=1"], "semi": ["--semi_epochs=1", "--semi_milestones=1"]}
METRICS = [("knn_top1_k20", "20-NN"), ("knn_top1_k1", "1-NN"), ("linear_top1", "linear"),
           ("knn10_top1_k1", "1-NN, 10% index"), ("semi10_top1", "semi 10%"),
           ("semi10_lr01_top1", "semi 10%, head lr 0.01")]
# The paper's orderings: (better row, worse row, metric, what the paper says).
ORDERINGS = [
    ("cmsf_2q", "msf", "knn_top1_k20", "CMSF-2Q > MSF on k-NN (self-supervised)"),
    ("cmsf_km", "msf", "knn_top1_k20", "CMSF-KM > MSF on k-NN (self-supervised)"),
    ("msf", "byol", "knn_top1_k20", "MSF > BYOL on k-NN"),
    ("cmsf_km", "cmsf_km_official", "knn_top1_k20", "CMSF-KM: nearest fill vs the authors' fill (not a claim of the paper)"),
    *[(row, base, "knn_top1_k20", f"multi-crop lifts {METHOD_NAMES[base]}, {held} (not a claim of the paper)")
      for row, (base, held) in MULTI_CROP_ROWS.items()],
    ("cmsf_2q_mc", "msf_mc", "knn_top1_k20", "CMSF-2Q > MSF on k-NN, both with multi-crop"),
    ("cmsf_km_mc", "msf_mc", "knn_top1_k20", "CMSF-KM > MSF on k-NN, both with multi-crop"),
    # The same at the equal wall-clock budget (11 epochs): where the two methods' early curves differ most.
    ("cmsf_2q_mc_time", "msf_mc_time", "knn_top1_k20", "CMSF-2Q > MSF on k-NN, both with multi-crop, equal wall-clock"),
    ("cmsf_km_mc_time", "msf_mc_time", "knn_top1_k20", "CMSF-KM > MSF on k-NN, both with multi-crop, equal wall-clock"),
    ("cmsf_pseudo", "msf", "semi10_top1", "CMSF-Pseudo (10% labels) > MSF, semi-supervised protocol"),
    ("cmsf_pseudo", "msf", "semi10_lr01_top1", "CMSF-Pseudo (10% labels) > MSF, semi-supervised protocol, head lr 0.01"),
    ("cmsf_pseudo", "msf", "knn10_top1_k1", "CMSF-Pseudo (10% labels) > MSF, 1-NN over the labelled 10%"),
    ("cmsf_sup", "xent", "knn_top1_k20", "supervised CMSF vs cross-entropy on k-NN (clean labels)"),
    ("cmsf_sup_noise25", "xent_noise25", "knn_top1_k20", "supervised CMSF > cross-entropy on k-NN, 25% noise"),
]


def run_name(row, seed):
    return f"{row}_s{seed}"


def train_args(row, seed, model_dir, data_dir, quick):
    flagfile, extra, _ = ROWS[row]
    args = [f"--flagfile={flagfile}", *extra, f"--seed={seed}", f"--model_dir={model_dir}"]
    if data_dir:
        args.append(f"--data_dir={data_dir}")
    return args + (QUICK_TRAIN if quick else [])


def eval_commands(row, model_dir, quick):
    """[(name, protocol, flags)] of the evaluations every run gets (semi: SEMI_ROWS only)."""
    quick_flags = lambda protocol: QUICK_EVAL.get(protocol, []) if quick else []  # noqa: E731
    commands = [("linear", "linear", [f"--model_dir={model_dir}", "--nolinear_augment", *quick_flags("linear")]),
                ("knn10", "knn", [f"--model_dir={model_dir}", "--index_split=labelled", f"--label_split={LABEL_SPLIT}",
                                  "--knn_k=1"])]
    if row in SEMI_ROWS:
        commands.append(("semi10", "semi", [f"--model_dir={model_dir}", f"--label_split={LABEL_SPLIT}", *quick_flags("semi")]))
    if row in SEMI_LR_ROWS:  # the same protocol with a 10x head lr: 6,000 images are 24 steps an epoch
        commands.append(("semi10_lr01", "semi", [f"--model_dir={model_dir}", f"--label_split={LABEL_SPLIT}",
                                                 "--semi_lr=0.01", *quick_flags("semi")]))
    return commands


# ----- the worker: one run, trained and evaluated in one process -----
def worker(specs):
    """Trains (or resumes) each run of `specs` and evaluates it, each step skipped if its output exists;
    writes <model_dir>/study/<name>.json per evaluation. Flags are parsed exactly as the CLIs parse
    them. (--quick runs every spec in one process: TensorFlow starts once.)"""
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)  # the flagfiles' paths are relative to the checkout
    import keras
    from absl import flags

    from cmsf_tf import evaluate, train

    config.define_flags()
    config.quiet_tensorflow()
    FLAGS = flags.FLAGS
    for spec in specs:
        keras.backend.clear_session()
        model_dir = spec["model_dir"]
        run = RunDir(model_dir)
        if not os.path.isfile(run.result_path):
            FLAGS.unparse_flags()
            FLAGS(["cmsf_tf.train", *spec["train"]])
            train.run(config.from_flags())
        os.makedirs(run.study_dir, exist_ok=True)
        for name, protocol, args in spec["evals"]:
            path = os.path.join(run.study_dir, f"{name}.json")
            if os.path.isfile(path):
                continue
            FLAGS.unparse_flags()
            FLAGS(["cmsf_tf.evaluate", *args])
            result = evaluate.evaluate(config.eval_from_flags(protocol))
            with open(path + ".tmp", "w") as f:
                json.dump(result, f, indent=2)
            os.replace(path + ".tmp", path)


# ----- collecting a finished run -----
def epoch_logs(logdir):
    """{tag: [(epoch, value)]} of the epoch/* scalars in a run's TensorBoard directory (the last value
    per epoch: a resumed run may write one twice)."""
    from tensorboard.backend.event_processing import event_accumulator
    import numpy as np
    import tensorflow as tf

    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        if tag.startswith("epoch/"):
            values = {e.step: float(np.asarray(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)}
            out[tag[len("epoch/"):]] = sorted(values.items())
    return out


def machine_name():
    """Where a run trained (its minutes are that machine's: a study's runs may span several). Read when the
    run is collected: the worker trains beside the process that collects it, and a run's directory stays
    on the machine that trained it."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import benchlib

    machine = benchlib.machine()
    return f"{machine['cpu']}, {machine['cores']} cores"


CPU_KERNELS = {("eigen",): "Eigen", ("onednn",): "oneDNN"}  # a run's train_cpu_kernels, as the summary names it


def counted(names):
    """'a (2 runs); b (1 run)': how many records carry each name, sorted by name."""
    counts = collections.Counter(names)
    return "; ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in sorted(counts.items()))


def machines_line(records, machine):
    """The summary's sentence on machines: the one it was made on, those its runs trained on and, where
    runs recorded them, the CPU kernel sets they ran (oneDNN's or Eigen's: the same step's time differs by
    up to 1.9x between them, so the minutes column compares runs only within one set). Records from before
    the machine or the kernels were kept are counted as not recorded."""
    trained = counted(r.get("machine") or "not recorded" for r in records)
    line = f"Summary made on: {machine}. Runs trained on: {trained or 'none yet'}."
    if any(r.get("train_cpu_kernels") for r in records):
        kernels = (CPU_KERNELS.get(tuple(r["train_cpu_kernels"]), "mixed") if r.get("train_cpu_kernels")
                   else "not recorded" for r in records)
        line += f" CPU kernels: {counted(kernels)}."
    return line


def collect(row, seed, model_dir, commands):
    """The record of a finished run: what the study's tables and the plot are made from."""
    sys.path.insert(0, ROOT)
    from cmsf_tf.callbacks import monitor

    run = RunDir(model_dir)
    with open(run.result_path) as f:
        result = json.load(f)
    record = {"run": run_name(row, seed), "row": row, "method": result["method"], "seed": seed,
              "epochs": result["epochs"], "steps": result["steps"],
              "knn_top1_k1": result["knn_top1_k1"], "knn_top1_k20": result["knn_top1_k20"]}
    for name in ("linear", "knn10", "semi10", "semi10_lr01"):
        path = os.path.join(run.study_dir, f"{name}.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            ev = json.load(f)
        if name == "knn10":
            record["knn10_top1_k1"] = ev["knn_top1_k1"]
            record["knn10_index_size"] = ev["index_size"]
        else:
            record[f"{name}_top1"] = ev["top1"]
            record[f"{name}_top1_last"] = ev.get("top1_last")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    record.update(train_wall_time_s=result.get("wall_time_s"), train_images_per_s=result.get("train_images_per_s"),
                  train_seconds_total=result.get("train_seconds_total"),
                  train_processes=result.get("train_processes"), train_cpu_kernels=result.get("train_cpu_kernels"),
                  commit=commit, commands=commands,
                  machine=machine_name())
    curve = monitor.read_jsonl(run.knn_curve)
    record["knn_curve"] = [[r["epoch"], r.get("knn_top1_k1"), r.get("knn_top1_k20")] for r in curve]
    if curve:
        record["knn_curve_sizes"] = {"queries": curve[-1]["queries"], "index": curve[-1]["index"]}
    if "rankme" in result:  # the features' effective rank (eval.spectrum), final and per epoch
        record["rankme"] = result["rankme"]
        record["rankme_curve"] = [[r["epoch"], r.get("rankme"), r.get("bank_rankme")] for r in curve if "rankme" in r]
    record["epoch_logs"] = epoch_logs(run.tensorboard)
    ranks = monitor.read_jsonl(run.rank_histograms)
    if ranks:
        record["rank_histograms"] = {str(r["epoch"]): r["counts"] for r in ranks}
    return record


def record_json(record):
    """A run's record as JSON with one top-level key per line and each value on its line: the rank
    histograms (up to 1,024 counts per epoch) and curves stay a few lines instead of one line per number."""
    return "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in record.items()) + "\n}\n"


def floors(data_dir, out):
    """Raw-pixel floors of the protocols (cosine k-NN on pixels, the linear probe on standardised
    pixels), computed once into <out>/floors.json."""
    path = os.path.join(out, "floors.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    sys.path.insert(0, ROOT)
    import numpy as np

    from cmsf_tf.data import sources, splits
    from cmsf_tf.eval import knn, linear
    from cmsf_tf.train import raw_pixel_knn

    source = sources.load("fashion_mnist", data_dir or "")
    result = {"source": "cosine k-NN and the linear probe (L2-normalised, standardised) on the raw pixels; "
                        "10% index: the percent:10 split of seed 0", **raw_pixel_knn(source)}
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    train_x = unit(source.train_images.reshape(source.num_train, -1).astype(np.float32))
    test_x = unit(source.test_images.reshape(len(source.test_images), -1).astype(np.float32))
    labelled = splits.percent_split(source.train_labels, 10, 0)
    result["knn10_top1_k1"] = knn.knn_accuracy(train_x[labelled], source.train_labels[labelled], test_x,
                                               source.test_labels, ks=(1,), num_classes=source.num_classes)["knn_top1_k1"]
    stats = linear.standardizer(train_x)
    steps = -(-len(train_x) // 256)
    batches = linear.cached_batches(linear.standardize(train_x, stats), source.train_labels, 256, 0)
    per_epoch = []
    test_z = linear.standardize(test_x, stats)
    linear.train_probe(batches, train_x.shape[1], source.num_classes, steps, 40, 0.01, 0.9, (15, 30), 1e-4, 0,
                       lambda *a: None, on_epoch_end=lambda e, h: per_epoch.append(
                           linear.top_k_accuracy(h.predict(test_z), source.test_labels)["top1"]))
    result["linear_top1"] = max(per_epoch)
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


# ----- the summary -----
def mean_spread(values):
    """(mean, spread): spread is the sample standard deviation (0 with one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values, scale=100.0, digits=1, signed=False):
    """mean ± standard deviation (number of values) of the values given, times `scale` (fractions to %);
    "–" when there are none. `signed`: the mean with its sign (differences)."""
    mean, spread = mean_spread(values)
    if mean is None:
        return "–"
    n = len([v for v in values if v is not None])
    mean, spread = scale * mean, scale * spread
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {spread:.{digits}f} ({n})" if n > 1 else f"{mean:{sign}.{digits}f} (1)"


def by_row(records):
    rows = {}
    for r in sorted(records, key=lambda r: (list(ROWS).index(r["row"]) if r["row"] in ROWS else 99, r["seed"])):
        rows.setdefault(r["row"], []).append(r)
    return rows


def ordering_verdict(better, worse, metric, rows):
    """One sentence: whether the mean of `better` exceeds `worse` on `metric`, by how much, and whether
    the gap exceeds the seed spread (the larger standard deviation of the two rows). With one seed of a
    row the spread is unknown, unless the other row's seeds already spread wider than the gap: a gap
    inside one row's spread is not resolved whatever the other's."""
    a = [r.get(metric) for r in rows.get(better, [])]
    b = [r.get(metric) for r in rows.get(worse, [])]
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    if ma is None or mb is None:
        return "not measured yet", None
    gap, spread = 100 * (ma - mb), 100 * max(sa, sb)
    n = min(len([v for v in a if v is not None]), len([v for v in b if v is not None]))
    if n == 1 and 0 < spread and abs(gap) <= spread:
        resolved = f"one seed of one row, the gap within the other's seed spread ({spread:.1f}): not resolved"
    elif n < 2:
        resolved = "one seed: spread unknown"
    elif abs(gap) > 2 * spread:
        resolved = f"beyond twice the seed spread ({spread:.1f})"
    elif abs(gap) > spread:
        resolved = f"beyond the seed spread ({spread:.1f}) but within twice it"
    else:
        resolved = f"within the seed spread ({spread:.1f}): not resolved"
    holds = "holds" if gap > 0 else "does not hold"
    return f"{holds}: {100 * ma:.1f} vs {100 * mb:.1f}, gap {gap:+.1f} points, {resolved}", gap


def last_epoch_value(record, tag):
    values = record.get("epoch_logs", {}).get(tag)
    return values[-1][1] if values else None


def training_minutes(record):
    """The run's training time in minutes: train_seconds_total (every process of a resumed run), or for a
    record made before that was kept, its steps at the last process's training speed (result.json's
    wall_time_s counts the last process alone). None when neither is known."""
    if record.get("train_seconds_total"):
        return record["train_seconds_total"] / 60
    speed = record.get("train_images_per_s")
    batch = train_flag(record.get("commands", {}).get("train", ""), "batch_size")
    if not speed or not batch or not record.get("steps"):
        return None
    return record["steps"] * int(batch) / speed / 60


def results_table(rows, floor):
    """Markdown lines: one row per study row (mean ± std over seeds), and the raw-pixel floors."""
    lines = ["| row | recipe | epochs | " + " | ".join(label for _, label in METRICS) + " | images/s | minutes |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for row, recs in rows.items():
        flagfile, extra, _ = ROWS.get(row, ("?", [], 0))
        recipe = f"`{os.path.basename(flagfile)}`" + (f" `{' '.join(extra)}`" if extra else "")
        speed = statistics.fmean([r["train_images_per_s"] for r in recs if r.get("train_images_per_s")] or [0])
        minutes = statistics.fmean([m for m in map(training_minutes, recs) if m] or [0])
        lines.append(f"| {row} | {recipe} | {recs[0]['epochs']} | "
                     + " | ".join(cell([r.get(key) for r in recs]) for key, _ in METRICS)
                     + f" | {speed:,.0f} | {minutes:.1f} |")
    if floor:
        lines.append("| raw pixels (floor) | – | – | " + " | ".join(
            f"{100 * floor[key]:.1f}" if key in floor else "–" for key, _ in METRICS) + " | – | – |")
    return lines


def ordering_lines(rows, planned=None):
    """The orderings that involve a row of this study: with `planned` (the study's rows), those whose two
    rows are both planned or measured, so a study lists only its own comparisons; without, every ordering
    with a measured row."""
    known = set(rows) | set(planned or ())

    def listed(better, worse):
        if planned is None:
            return better in rows or worse in rows
        return better in known and worse in known

    return [f"- **{claim}** (`{metric}`): {ordering_verdict(better, worse, metric, rows)[0]}."
            for better, worse, metric, claim in ORDERINGS if listed(better, worse)]


def multi_crop_lines(rows):
    """Markdown lines: for each row with small crops whose row without is in the study, the change on every
    protocol (with minus without, points). Seeds are paired (seed s with seed s: the same initial network
    and the same large views, the small crops being folded off the views' seeds), so the cell is the mean
    ± standard deviation of the per-seed differences. The budget of the equal wall-clock rows comes from
    the benchmarked step ratio: the study's runs share the machine unequally, so their own clocks are no
    fair measure of it."""
    pairs = [(row, base, held) for row, (base, held) in MULTI_CROP_ROWS.items() if row in rows and base in rows]
    if not pairs:
        return []
    lines = ["", "## Multi-crop: with minus without", "",
             "Points of top-1 %, mean ± standard deviation over the differences of paired seeds (number of "
             f"pairs). Equal wall-clock: {MULTI_CROP_EPOCHS} epochs with the small crops cost what 20 cost without, "
             "by the step times measured side by side (`bench/results_multi_crop.json`).", "",
             "| row | against | held equal | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for row, base, held in pairs:
        without = {r["seed"]: r for r in rows[base]}
        paired = [(r, without[r["seed"]]) for r in rows[row] if r["seed"] in without]

        def delta(key):
            return cell([a[key] - b[key] for a, b in paired if a.get(key) is not None and b.get(key) is not None],
                        signed=True)

        lines.append(f"| {row} | {base} | {held} | " + " | ".join(delta(key) for key, _ in METRICS) + " |")
    return lines


def write_readme_block(readme, records, floor, planned, study_rows=None):
    """Rewrites a page (docs/results.md) between <!-- study:start --> and <!-- study:end -->: the study's status, its
    table and the orderings, from the JSONs (so the page says what the committed results say)."""
    with open(readme) as f:
        text = f.read()
    start, end = "<!-- study:start -->", "<!-- study:end -->"
    if start not in text or end not in text:
        sys.exit(f"error: {readme} has no {start} ... {end} block")
    rows = by_row(records)
    status = (f"All {planned} runs are done." if len(records) >= planned else
              f"Status: {len(records)} of {planned} runs done (seed-major: every row's first seed before any "
              "second seed; `make reproduce` continues the study).")
    block = [start, status, "", "Top-1 % on the 10,000 test images, mean ± standard deviation over seeds (number of "
             "seeds); `results/fmnist/summary.md` adds the diagnostics, `results/fmnist/summary.png` the curves and "
             "rank histograms.", "", *results_table(rows, floor), "",
             "The paper's orderings, read against the seed spread (generated):", "",
             *ordering_lines(rows, study_rows), end]
    head, rest = text.split(start, 1)
    with open(readme, "w") as f:
        f.write(head + "\n".join(block) + rest.split(end, 1)[1])


def load_records(out):
    """The finished runs' records in `out`. A run trained before RankMe was logged takes its RankMe from
    `out`/rankme/<run>.json when there is one (`cmsf_tf.evaluate knn` on its last checkpoint: the same
    features, index and subsample as the training's final measurement); the record files stay as made."""
    records = []
    for name in sorted(os.listdir(out)):
        if not name.endswith(".json") or name == "floors.json":
            continue
        with open(os.path.join(out, name)) as f:
            record = json.load(f)
        measured = os.path.join(out, "rankme", name)
        if record.get("rankme") is None and os.path.isfile(measured):
            with open(measured) as f:
                record["rankme"] = json.load(f).get("rankme")
        records.append(record)
    return records


def train_flag(command, name):
    """The value of --`name` in a recorded train command, its flag files expanded by absl as the trainer
    expands them (relative to the checkout, where the study runs training; the last occurrence wins);
    None when neither the command nor its flag files set it."""
    from absl import flags

    with contextlib.chdir(ROOT):  # command: "python -m cmsf_tf.train --flag ..."
        args = flags.FlagValues().read_flags_from_files(command.split()[3:], force_gnu=False)
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    return values[-1] if values else None


def rank_summary(counts, k):
    """(share within the plain top-k, median 0-based rank, share in the last bin: every rank from
    RANK_BINS - 1 on, 0 when the histogram stops short of it) of one epoch's histogram of the constrained
    neighbours' ranks in the unconstrained order."""
    import numpy as np

    c = np.asarray(counts, float)
    c /= max(c.sum(), 1.0)
    tail = c[-1] if len(c) >= RANK_BINS else 0.0
    return float(c[:k].sum()), int(np.searchsorted(np.cumsum(c), 0.5)), float(tail)


def rank_lines(rows):
    """Markdown: per row with rank histograms, at the first epoch with the constraint active (the second;
    the first is the plain top-k by construction), the middle and the last epoch: how much of the
    constrained set lies in the plain top-k, its median rank and the share beyond the histogram's range."""
    lines = []
    for row, recs in rows.items():
        recs = [r for r in recs if r.get("rank_histograms")]
        if not recs:
            continue
        k = int(train_flag(recs[0]["commands"]["train"], "topk") or TOPK_DEFAULT)
        epochs = sorted(int(e) for e in recs[0]["rank_histograms"])
        for epoch in sorted({epochs[min(1, len(epochs) - 1)], epochs[len(epochs) // 2], epochs[-1]}):
            stats = [rank_summary(r["rank_histograms"][str(epoch)], k) for r in recs
                     if str(epoch) in r["rank_histograms"]]
            within, median, tail = zip(*stats)
            lines.append(f"| {row} | {epoch} | {cell(within)} | {statistics.median(median):,.0f} "
                         f"({min(median):,}–{max(median):,}) | {cell(tail)} |")
    if not lines:
        return []
    return ["", "## Where the constrained neighbours come from", "",
            "From each run's per-epoch histogram of the constrained neighbours' ranks in the unconstrained "
            "order (`constrained_ranks.jsonl`, 32 queries per step), at the first epoch with the constraint "
            "active for every row (the second: in the first, CMSF-2Q has no previous view and CMSF-KM no clusters "
            "yet, so their constrained set is the plain top-k), the middle and the last epoch. Shares in % (mean ± std over "
            "seeds); median rank: the median over seeds (seed range); the last bin holds every rank from "
            f"{RANK_BINS - 1:,} on.", "",
            "| row | epoch | share within the plain top-k | median rank | share in the last bin |",
            "|---|---|---|---|---|", *lines]


def write_summary(records, floor, out, machine, study="main", study_rows=None):
    rows = by_row(records)
    made_by = "`python tools/reproduce_small.py` (`make reproduce`)" if study == "main" else (
        f"`python tools/reproduce_small.py --study={study}`")
    lines = [f"# Fashion-MNIST study: {STUDIES[study]['title']}", "",
             f"Made by {made_by}; each run's numbers, commands, k-NN "
             "curve, epoch logs and rank histograms are in the `<row>_s<seed>.json` files beside this one. "
             + machines_line(records, machine), "",
             "Cells: mean ± standard deviation over seeds (number of seeds), top-1 % on the 10,000 test images. "
             "images/s: training speed over the run's last uninterrupted stretch; minutes: the run's training time "
             "over all its processes (runs recorded before that was kept: its steps at the last stretch's speed; "
             "runs that shared the machine with others ran slower: not a benchmark).", "",
             *results_table(rows, floor)]
    lines += ["", "## The paper's orderings", "",
              "A gap counts as resolved when it exceeds the larger of the two rows' seed standard deviations "
              "(and clearly so beyond twice it).", "", *ordering_lines(rows, study_rows)]
    # RankMe only where the runs logged it (runs trained before it existed have none: no empty column)
    with_rank = any(r.get("rankme") is not None for r in records)
    lines += multi_crop_lines(rows)
    lines += ["", "## Diagnostics at the last epoch (mean over seeds)", "",
              "purity: the share of the loss's neighbours (the constrained set where there is one) with the "
              "query's true label; unconstrained: the plain top-k's; rank: mean 0-based rank of the "
              "constrained neighbours in the unconstrained order ((k - 1) / 2 when they are the plain top-k: 2 for k = 5)"
              + ("; RankMe: the effective rank of the trained backbone's unit-length features of the training images "
                 "after the last epoch (`cmsf_tf.eval.spectrum`; 128 dimensions at width 16; mean ± standard "
                 "deviation (seeds); runs trained before it was logged: `evaluate knn` on their last checkpoint, "
                 "`rankme/<run>.json`"
                 + (f"; raw pixels: {floor['rankme']:.0f} of 784" if floor and "rankme" in floor else "") + ")"
                 if with_rank else "") + ".", "",
              "| row | loss | purity | purity unconstrained | constrained rank | pseudo-label precision | "
              "confident fraction |" + (" RankMe |" if with_rank else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if with_rank else "")]
    for row, recs in rows.items():
        def mean_of(tag, scale=1.0, digits=3):
            values = [last_epoch_value(r, tag) for r in recs]
            values = [v for v in values if v is not None]
            return f"{scale * statistics.fmean(values):.{digits}f}" if values else "–"
        lines.append(f"| {row} | {mean_of('loss')} | {mean_of('purity')} | {mean_of('purity_unconstrained')} | "
                     f"{mean_of('constrained_rank', digits=1)} | {mean_of('pseudo_accuracy')} | "
                     f"{mean_of('confident_fraction')} |"
                     + (f" {cell([r.get('rankme') for r in recs], scale=1.0)} |" if with_rank else ""))
    lines += rank_lines(rows)
    lines += ["", "![k-NN per epoch, final accuracy per seed, constrained ranks](summary.png)", ""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))


def write_plot(records, floor, out):
    """summary.png: 20-NN per epoch per method (one line per seed), final 20-NN per method (one point
    per seed), and the rank histograms of CMSF-2Q and CMSF-KM at the first, middle and last epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = by_row(records)
    colours = {row: plt.cm.tab10(i % 10) for i, row in enumerate(ROWS)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    for row, recs in rows.items():
        for i, r in enumerate(recs):
            curve = [(e, k20) for e, _, k20 in r.get("knn_curve", []) if k20 is not None]
            if curve:
                e, acc = zip(*curve)
                ax.plot(e, 100 * np.array(acc), color=colours.get(row), alpha=0.8, label=row if i == 0 else None)
    if floor:
        ax.axhline(100 * floor["knn_top1_k20"], color="grey", ls="--", label="raw pixels")
    sizes = next((r["knn_curve_sizes"] for r in records if r.get("knn_curve_sizes")), None)
    subset = f" ({sizes['queries']:,} test images, {sizes['index']:,}-image index)" if sizes else ""
    ax.set(xlabel="epoch", ylabel="20-NN top-1 %" + subset, title="k-NN during training (--knn_every)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for x, (row, recs) in enumerate(rows.items()):
        values = [100 * r["knn_top1_k20"] for r in recs]
        ax.scatter([x] * len(values), values, color=colours.get(row))
        ax.plot([x - 0.25, x + 0.25], [np.mean(values)] * 2, color=colours.get(row))
    if floor:
        ax.axhline(100 * floor["knn_top1_k20"], color="grey", ls="--")
    ax.set_xticks(range(len(rows)), list(rows), rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="20-NN top-1 % (full test split)", title="final accuracy, one point per seed")
    for ax, row in zip(axes[1], ("cmsf_2q", "cmsf_km")):
        histograms = {}
        for r in rows.get(row, []):
            for epoch, counts in r.get("rank_histograms", {}).items():
                acc = histograms.setdefault(int(epoch), np.zeros(0))
                counts = np.asarray(counts, float)
                size = max(len(acc), len(counts))
                histograms[int(epoch)] = np.pad(acc, (0, size - len(acc))) + np.pad(counts, (0, size - len(counts)))
        epochs = sorted(histograms)
        shown = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]}) if epochs else []
        edges = np.unique(np.concatenate([[0, 1, 2, 3, 4, 5], np.geomspace(5, 1024, 16).round()]))
        for epoch in shown:
            counts = histograms[epoch]
            ranks = np.arange(len(counts))
            binned, _ = np.histogram(ranks, bins=edges, weights=counts)
            ax.stairs(binned / max(counts.sum(), 1), edges, label=f"epoch {epoch}")
        ax.set_xscale("symlog", linthresh=5)
        ax.set(xlabel="rank of a constrained neighbour in the unconstrained order (0-based; last bin 1023+)",
               ylabel="fraction", title=f"{row}: where the constrained neighbours come from")
        if shown:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {row} run yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "summary.png"), dpi=110)
    plt.close(fig)


# ----- the study -----
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="main", choices=list(STUDIES),
                        help="which study: its rows, seeds and directories are the defaults of the flags below")
    parser.add_argument("--out", default="", help="per-run JSONs, summary (default: the study's, under results/)")
    parser.add_argument("--runs", default="", help="model dirs and logs (default: the study's, under runs/)")
    parser.add_argument("--rows", default="", help="comma-separated rows of ROWS to run (default: the study's)")
    parser.add_argument("--seeds", type=int, default=0,
                        help="seeds per row (0: the study's number, else each row's own)")
    parser.add_argument("--data_dir", default="", help="Fashion-MNIST directory (default: the usual place)")
    parser.add_argument("--quick", action="store_true", help="a few steps per method, one seed: a smoke test")
    parser.add_argument("--summary_only", action="store_true", help="rebuild summary.md and the plot only")
    parser.add_argument("--readme", default="", help="also rewrite this page's <!-- study:start/end --> block (docs/results.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from cmsf_tf.train import Interrupted

        try:
            worker(json.loads(args.worker))
        except config.UsageError as e:
            sys.exit(f"error: {e}")
        except Interrupted as e:  # the checkpoint is saved: one line, the exit code train's CLI uses
            print(f"stopped by {e}; the checkpoint is saved: run the study again to resume", file=sys.stderr)
            sys.exit(143 if str(e) == "SIGTERM" else 130)
        return
    study = STUDIES[args.study]
    args.out = args.out or os.path.join(ROOT, study["out"])
    args.runs = args.runs or os.path.join(ROOT, study["runs"])
    args.seeds = args.seeds or study["seeds"]
    rows = [r for r in args.rows.split(",") if r] or list(study["rows"])
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"error: unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.runs, exist_ok=True)
    # Seed-major order: an interrupted study has every row's first seed before any row's second.
    seeds = {row: 1 if args.quick else (args.seeds or ROWS[row][2]) for row in rows}
    plan = [(row, seed) for seed in range(max(seeds.values())) for row in rows if seed < seeds[row]]
    pending = []
    for row, seed in [] if args.summary_only else plan:
        name = run_name(row, seed)
        if os.path.isfile(os.path.join(args.out, f"{name}.json")):
            continue
        model_dir = os.path.join(args.runs, name)
        pending.append((row, seed, {"model_dir": model_dir,
                                    "train": train_args(row, seed, model_dir, args.data_dir, args.quick),
                                    "evals": eval_commands(row, model_dir, args.quick)}))
    # One worker process per run (a crash costs that run only); --quick: one for all (TensorFlow starts once).
    groups = [pending] if args.quick and pending else [[p] for p in pending]
    failed, done = [], len(plan) - len(pending)
    # The summary describes the study, whichever of its rows this call trains (--rows=X alone must not drop
    # the comparisons of rows still to come), and is rebuilt after every run, so a study stopped halfway
    # leaves one that is up to date.
    study_rows = list(dict.fromkeys([*study["rows"], *rows]))

    def refresh():
        records = load_records(args.out)
        floor = floors(args.data_dir, args.out) if not args.quick else None
        write_summary(records, floor, args.out, machine_name(), args.study, study_rows)
        write_plot(records, floor, args.out)
        if args.readme:
            write_readme_block(args.readme, records, floor, len(plan), rows)
        return records

    shown_runs = os.path.relpath(os.path.abspath(args.runs), ROOT)
    if shown_runs.startswith(".."):  # outside the checkout: named as if under runs/
        shown_runs = os.path.join("runs", os.path.basename(os.path.abspath(args.runs)))
    for group in groups:
        names = [run_name(row, seed) for row, seed, _ in group]
        log_path = os.path.join(args.runs, f"{names[0] if len(names) == 1 else 'quick'}.log")
        print(f"[{done + 1}/{len(plan)}] {', '.join(names)}: training and evaluating (log: {log_path})", flush=True)
        started = time.time()
        with open(log_path, "a") as log:
            code = subprocess.call([sys.executable, os.path.abspath(__file__), "--worker",
                                    json.dumps([spec for _, _, spec in group])],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))  # a live log
        for row, seed, spec in group:
            name = run_name(row, seed)
            if code or not os.path.isfile(RunDir(spec["model_dir"]).result_path):
                failed.append(name)
                why = "stopped" if code in (130, 143) else f"failed (exit {code})"
                print(f"  {name} {why}; see {log_path}. Run again to continue it.", flush=True)
                continue
            commands = {"train": "python -m cmsf_tf.train " + " ".join(spec["train"])}
            commands.update({n: f"python -m cmsf_tf.evaluate {p} " + " ".join(a) for n, p, a in spec["evals"]})
            # As run from the checkout: no machine's absolute paths in the record.
            commands = {n: c.replace(os.path.abspath(args.runs), shown_runs) for n, c in commands.items()}
            record = collect(row, seed, spec["model_dir"], commands)
            out_path = os.path.join(args.out, f"{name}.json")
            with open(out_path + ".tmp", "w") as f:
                f.write(record_json(record))
            os.replace(out_path + ".tmp", out_path)
            done += 1
            print(f"  {name}: 20-NN {100 * record['knn_top1_k20']:.1f}%, linear {100 * record.get('linear_top1', 0):.1f}% "
                  f"({(time.time() - started) / 60:.1f} min)", flush=True)
        if group is not groups[-1]:
            refresh()
    records = refresh()
    print(f"wrote {os.path.join(args.out, 'summary.md')} and summary.png ({len(records)} runs)")
    if failed:
        sys.exit(f"error: {len(failed)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

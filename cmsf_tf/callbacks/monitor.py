"""Learning curves during training: per-epoch k-NN accuracy with the features' RankMe, the
constrained neighbours' ranks, and the time each process trained.

Each keeps a JSON-lines record in --model_dir (the first two next to their TensorBoard summaries), so a
study can plot them without reading event files, and a resumed run appends to the record it had.
"""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from cmsf_tf.callbacks.checkpoint import global_step


def read_jsonl(path, key="epoch"):
    """The records of a JSON-lines file, the last one per `key` (a resumed run may repeat an epoch), in
    `key` order; [] when the file does not exist. A torn last line (a kill mid-write) is skipped."""
    if not os.path.isfile(path):
        return []
    records = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            records[record[key]] = record
    return [records[k] for k in sorted(records)]


def _append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def feature_function(backbone, strategy, jit_compile=False):
    """images -> the backbone's features in inference mode: a tf.function on the strategy's first device
    (distribute.on_first_device), compiled with XLA when the run compiles."""
    from cmsf_tf import distribute

    def features(images):
        with distribute.on_first_device(strategy):
            return backbone(images, training=False)

    return tf.function(features, jit_compile=jit_compile)


def evenly_spaced(count, wanted):
    """A keep-function (index, label, name) -> bool for pipeline.eval_split choosing about `wanted` of
    `count` examples, evenly spaced by index (0 or >= count: all). Fixed, so every epoch's k-NN is
    measured on the same images."""
    stride = max(count // wanted, 1) if 0 < wanted < count else 1
    if stride == 1:
        return None
    return lambda index, label, name: tf.equal(index % stride, 0)


class KnnMonitor(keras.callbacks.Callback):
    """Every `every` epochs and after the last one: 1-NN and 20-NN top-1 (majority vote, as the final
    evaluation) of the online backbone in inference mode, the queries a fixed, evenly spaced subset of
    the test split and the index the training split (or an evenly spaced subset); with them the RankMe
    of the index's features and of the memory bank's embeddings (eval.spectrum: a collapsing
    representation shows there first). Written to TensorBoard as eval/knn_top1_k1, eval/knn_top1_k20,
    eval/rankme and eval/bank_rankme at the global step, to `curve_path` (JSON lines) and to the epoch
    logs. Run it on the chief only, after the checkpoint saver (a kill during the
    evaluation loses no training); a resumed run measures its last epoch if the curve lacks it."""

    def __init__(self, every, source, image_size, batch_size, steps_per_epoch, total_epochs, queries=2000, index=0,
                 logdir=None, curve_path=None, log=print, jit_compile=False):
        super().__init__()
        self.jit_compile = jit_compile
        self.every, self.steps_per_epoch, self.total_epochs = int(every), int(steps_per_epoch), int(total_epochs)
        self.source, self.image_size, self.batch_size = source, image_size, batch_size
        self.queries, self.index = int(queries), int(index)
        self.writer = tf.summary.create_file_writer(logdir) if logdir else None
        self.curve_path = curve_path
        self.log = log
        self._features = None

    def due(self, epochs_done):
        return epochs_done > 0 and (epochs_done % self.every == 0 or epochs_done == self.total_epochs)

    def measure(self):
        """{knn_top1_k1, knn_top1_k20, rankme, bank_rankme (with a bank), queries, index, seconds} of the
        current online backbone."""
        from cmsf_tf import ops
        from cmsf_tf.eval import knn, spectrum

        started = time.time()
        if self._features is None:
            self._features = feature_function(self.model.online_backbone, self.model.distribute_strategy,
                                              self.jit_compile)
        result, index, queries = knn.split_knn(
            self._features, self.source, self.image_size, self.batch_size,
            index_keep=evenly_spaced(self.source.num_train, self.index),
            query_keep=evenly_spaced(self.source.num_test, self.queries))
        bank = getattr(self.model, "bank", None)
        if bank is not None:  # the loss's own embedding space: what the mean shift pulls together
            result["bank_rankme"] = round(spectrum.rankme(ops.l2_normalize(tf.convert_to_tensor(bank.embeddings))), 2)
        result.update(queries=queries, index=index, seconds=round(time.time() - started, 1))
        return result

    def record(self, epochs_done, logs=None):
        step = global_step(self.model)
        result = self.measure()
        if self.writer is not None:
            with self.writer.as_default(step=step):
                for key in ("knn_top1_k1", "knn_top1_k20", "rankme", "bank_rankme"):
                    if key in result:
                        tf.summary.scalar(f"eval/{key}", result[key])
            self.writer.flush()
        if self.curve_path:
            _append_jsonl(self.curve_path, {"epoch": epochs_done, "step": step, **result})
        if logs is not None:
            logs.update({key: value for key, value in result.items() if key.startswith("knn_top1")})
        accuracies = "  ".join(f"{k.rsplit('_k', 1)[1]}-NN {100 * v:.1f}%" for k, v in result.items()
                               if k.startswith("knn_top1"))
        ranks = "".join(f", {name} {result[key]:.1f}" for key, name in
                        (("rankme", "RankMe"), ("bank_rankme", "bank RankMe")) if key in result)
        self.log(f"epoch {epochs_done}: k-NN top-1 {accuracies}{ranks} ({result['queries']:,} test images, "
                 f"{result['index']:,} in the index, {result['seconds']:.0f} s)")

    def on_train_begin(self, logs=None):
        step = global_step(self.model)
        if step == 0 or step % self.steps_per_epoch:
            return
        epochs_done = step // self.steps_per_epoch
        measured = {r["epoch"] for r in read_jsonl(self.curve_path)} if self.curve_path else set()
        if self.due(epochs_done) and epochs_done not in measured:
            self.record(epochs_done)

    def on_epoch_end(self, epoch, logs=None):
        if self.due(epoch + 1):
            self.record(epoch + 1, logs)


class RankHistograms(keras.callbacks.Callback):
    """At every epoch end, the histogram of the constrained neighbours' ranks in the unconstrained order
    that the model's `rank_tracker` (methods.base.RankHistogram) counted over the epoch: TensorBoard
    histogram constraint/rank_histogram at the global step, and one JSON line {epoch, step, counts} (counts
    per rank 0, 1, ...; the last bin holds every rank beyond it). Nothing for methods without a
    constraint. Give it to every worker of a multi-worker run (the read is a collective), with `logdir`
    and `path` on the chief only."""

    def __init__(self, logdir=None, path=None):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir) if logdir else None
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        tracker = getattr(self.model, "rank_tracker", None)
        counts = tracker.counts() if tracker is not None else np.zeros(0, np.int64)
        if counts.sum() == 0:
            return
        step = global_step(self.model)
        if self.writer is not None:
            with self.writer.as_default(step=step):
                tf.summary.histogram("constraint/rank_histogram", np.repeat(np.arange(len(counts)), counts).astype(np.float32),
                                     buckets=64)
            self.writer.flush()
        if self.path:
            last = int(np.flatnonzero(counts).max()) + 1
            _append_jsonl(self.path, {"epoch": epoch + 1, "step": step, "counts": counts[:last].tolist()})


class TrainingTime(keras.callbacks.Callback):
    """The training time of every process of a run, resumed ones included: one JSON line {stretch,
    first_step, step, seconds, cpu_kernels} per epoch end and one when this process stops training,
    `stretch` naming the process. A process killed outright (kill -9) loses at most the time since its last
    epoch end. Seconds count model.fit with its callbacks; `seconds` is the last recorded
    (train_images_per_s divides this process's steps by it). `cpu_kernels` ("onednn" or "eigen", None where
    not given) says which of TensorFlow's CPU kernel sets the process ran: on a CPU the same step takes up
    to 1.9x as long on one as on the other (bench/README.md), so a run's seconds mean little without it.
    Chief only."""

    def __init__(self, path, first_step, clock=time.monotonic, cpu_kernels=None):
        super().__init__()
        self.path, self.first_step, self._clock = path, int(first_step), clock
        self.cpu_kernels = cpu_kernels
        self.started = clock()
        self.seconds = 0.0
        self.stretch = f"{time.time():.6f}-{os.getpid()}"

    def record(self, step):
        self.seconds = self._clock() - self.started
        _append_jsonl(self.path, {"stretch": self.stretch, "first_step": self.first_step, "step": int(step),
                                  "seconds": round(self.seconds, 3), "cpu_kernels": self.cpu_kernels})

    def on_epoch_end(self, epoch, logs=None):
        self.record(global_step(self.model))


def training_time(records):
    """result.json's totals from TrainingTime's records (read_jsonl(path, key="stretch"): the last line of
    each process): seconds over every process, steps redone after a kill included, the number of processes,
    and the CPU kernel sets they ran (sorted; two when a resumed run changed TF_ENABLE_ONEDNN_OPTS; lines
    written before the kernels were recorded are left out). {} without records."""
    if not records:
        return {}
    return {"train_seconds_total": round(sum(r["seconds"] for r in records), 1),
            "train_processes": len(records),
            "train_cpu_kernels": sorted({r["cpu_kernels"] for r in records if r.get("cpu_kernels")})}

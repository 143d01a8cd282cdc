"""Train a representation: python -m cmsf_tf.train --flagfile=flags/demo.cfg [--flag=value ...]

Sections: set-up (flags, model dir, data, strategy) -> model and optimizer -> resume -> fit, epoch by
epoch -> k-NN evaluation -> result.json. A run resumes by itself from the newest checkpoint in
--model_dir, mid-epoch included, and continues exactly (same data order, augmentations and state).
"""

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time

from cmsf_tf import config
from cmsf_tf.errors import UserError


def is_chief_process(cfg):
    """Whether this process owns --model_dir: always, except the non-chief workers of a multi-worker
    run (read from TF_CONFIG, before TensorFlow starts)."""
    if cfg.strategy != "multi_worker":
        return True
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except ValueError:
        raise config.UsageError("the TF_CONFIG environment variable is not valid JSON") from None
    task, cluster = tf_config.get("task", {}), tf_config.get("cluster", {})
    return task.get("type") in (None, "chief") or (task.get("type") == "worker" and int(task.get("index", 0)) == 0
                                                   and "chief" not in cluster)


def prepare_model_dir(cfg):
    """Creates --model_dir, proves it writable, takes its lock (the chief; held until the process ends)
    and refuses to resume a different run in it. Returns the lock (None on other workers)."""
    from cmsf_tf import rundir

    path = cfg.model_dir
    try:
        os.makedirs(path, exist_ok=True)
        # One probe name per process: workers of one fleet probe the same directory at the same moment.
        probe = os.path.join(path, f".write_test.{os.uname().nodename}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise config.UsageError(f"cannot write to --model_dir {path}: {e.strerror or e}") from None
    chief = is_chief_process(cfg)
    run_dir = rundir.RunDir(path)
    held = run_dir.lock() if chief else None
    previous = run_dir.flags() if os.path.isdir(run_dir.checkpoints) else None
    if previous is not None:
        for name in config.RUN_IDENTITY:
            if name in previous and previous[name] != getattr(cfg, name):
                raise config.UsageError(
                    f"--model_dir {path} holds a run with --{name}={previous[name]}, but this one asks for "
                    f"--{name}={getattr(cfg, name)}; use another --model_dir or the same flags to resume")
    if chief:
        # Written whole then renamed: another worker reading it meanwhile sees the old file or the new, never half.
        run_dir.write_flags(cfg.to_dict())
    return held


def learning_rate_schedule(cfg, total_steps, steps_per_epoch):
    import keras

    warmup = min(cfg.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=max(total_steps, 1))
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(total_steps - warmup, 1), warmup_target=cfg.learning_rate, warmup_steps=warmup)


def training_labels(cfg, source):
    """data.labels.training_labels with the run's settings."""
    from cmsf_tf.data import labels

    return labels.training_labels(source, cfg.label_split, cfg.label_noise, cfg.label_noise_file, cfg.seed,
                                  cfg.dataset)


def build_model(cfg, sync_bn, num_images, num_classes):
    from cmsf_tf.methods import METHODS

    return METHODS[cfg.method].from_run_config(cfg, sync_bn=sync_bn, num_images=num_images, num_classes=num_classes)


# The --model_dir locks this process holds: open files whose flock lasts as long as they stay open.
_RUN_LOCKS = []


class Interrupted(Exception):
    """The run stopped on SIGTERM or Ctrl-C after saving a checkpoint."""


@contextlib.contextmanager
def stop_signals(stopper, log):
    """SIGTERM (schedulers, `kill`) and Ctrl-C ask `stopper` (the CheckpointSaver, or under multi-worker
    the CoordinatedStop that tells every worker) to save at the next step boundary and stop; a second
    Ctrl-C stops at once (the newest checkpoint stays the last one saved)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

    def handle(signum, frame):
        if stopper.stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stopper.request_stop(names[signum])
        log(f"{names[signum]}: saving a checkpoint at the next step and stopping (Ctrl-C again: stop now)")

    previous = {sig: signal.signal(sig, handle) for sig in names}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fit_epochs(cfg, model, strategy, source, labels, callbacks, saver, step, steps_per_epoch, total_steps,
               checkpoint_dir):
    """model.fit from `step` to the end (or an early stop); returns the global step reached."""
    import tensorflow as tf

    from cmsf_tf.callbacks.checkpoint import Diverged, SaveFailed, global_step
    from cmsf_tf.data import pipeline
    from cmsf_tf.methods import METHODS

    from cmsf_tf import distribute

    view_dtype = distribute.view_dtype(strategy)
    while step < total_steps and not saver.stopped_early:
        if cfg.stop_after_steps and step >= cfg.stop_after_steps:
            break
        epoch, done = divmod(step, steps_per_epoch)
        # A resumed run may start mid-epoch: finish that epoch alone, then run whole epochs.
        end_epoch = epoch + 1 if done else cfg.epochs
        data = strategy.distribute_datasets_from_function(
            lambda context, epoch=epoch, end_epoch=end_epoch, done=done: pipeline.train_dataset(
                source, global_batch=cfg.batch_size, image_size=cfg.image_size, seed=cfg.seed,
                steps_per_epoch=steps_per_epoch, start_epoch=epoch, end_epoch=end_epoch, skip_steps=done,
                labels=labels, crop_min_scale=cfg.crop_min_scale, blur_prob=cfg.blur_prob,
                input_context=context, shuffle_buffer=cfg.shuffle_buffer, view_dtype=view_dtype,
                **METHODS[cfg.method].views(cfg)))
        try:
            model.fit(data, epochs=end_epoch, initial_epoch=epoch, steps_per_epoch=steps_per_epoch - done,
                      callbacks=callbacks, shuffle=False, verbose="auto" if sys.stdout.isatty() else 2)
        except Diverged as e:
            last = tf.train.latest_checkpoint(checkpoint_dir) or "none"
            raise config.UsageError(f"{e}; stopped without saving it (last good checkpoint: {last})") from None
        except SaveFailed as e:
            last = tf.train.latest_checkpoint(checkpoint_dir) or "none"
            raise config.UsageError(f"{e}; the previous checkpoints are intact (newest: {last}): make room and run "
                                    "the same command again to resume") from None
        step = global_step(model)
    return step


def run(cfg, log=print):
    """Trains (or resumes) the run described by `cfg`. Returns the result dict, or None if the run
    stopped early at --stop_after_steps. A run refused before it wrote anything but its flags (no data,
    a bad batch size, ...) leaves no directory behind that looks like a run."""
    from cmsf_tf import rundir

    started = time.time()
    created = not os.path.exists(cfg.model_dir)
    held = prepare_model_dir(cfg)
    _RUN_LOCKS.append(held)  # held until the process ends (released by the kernel then)
    try:
        return _run_prepared(cfg, log, started)
    except UserError:
        if held is not None and rundir.RunDir(cfg.model_dir).discard_unstarted(created):
            _RUN_LOCKS.remove(held)
            held.close()
        raise


def _run_prepared(cfg, log, started):
    from cmsf_tf.data import sources  # NumPy only: bad data is reported before TensorFlow loads

    source = sources.load(cfg.dataset, cfg.data_dir, cfg.class_list, cfg.max_corrupt_fraction)
    for path, reason in source.skipped[:20]:
        log(f"warning: skipping {path}: {reason}")
    if len(source.skipped) > 20:
        log(f"warning: {len(source.skipped)} corrupt images skipped in all")
    if not source.has_train_labels():
        if cfg.label_split or cfg.label_noise or cfg.label_noise_file:
            raise config.UsageError(f"--label_split/--label_noise need labels, and {cfg.dataset}'s training images "
                                    "have none (no class folders)")
        if cfg.knn_eval and cfg.knn_every and source.knn_source() is None:
            raise config.UsageError(source.no_labels_reason(cfg.dataset, "--knn_every"))
    labels = training_labels(cfg, source)

    from cmsf_tf import distribute
    distribute.configure_cpu_devices(cfg.cpu_devices)  # before the first TF op
    if cfg.deterministic:
        # enable_op_determinism makes each kernel deterministic, but the train step still differed in the
        # last bits from its second step on between identical runs (1e-7 in the weights, 0.064 in the bank
        # after 12 demo steps) unless the graph's independent ops run one at a time: the order in which
        # the inter-op pool finishes them changes float round-off. Intra-op threads stay.
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(1)

    import keras
    import tensorflow as tf

    from cmsf_tf import rundir
    from cmsf_tf.callbacks.checkpoint import CheckpointSaver, DivergenceGuard, global_step
    from cmsf_tf.callbacks.summaries import ScalarSummaries

    keras.utils.set_random_seed(cfg.seed)
    onednn, cpu_flags = distribute.onednn_on(), distribute.cpu_flags()
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
        if distribute.nondeterministic_cpu_kernels(onednn, cpu_flags):
            log("warning: --deterministic with TensorFlow's oneDNN CPU kernels on a CPU without AVX-512: identical "
                "runs differ there (docs/resume.md); unset TF_ENABLE_ONEDNN_OPTS for bit-exact runs and resumes")
    else:
        hint = distribute.eigen_kernels_hint(onednn, cpu_flags, os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
        if hint:
            log(hint)
    if cfg.mixed_precision != "float32":
        keras.mixed_precision.set_global_policy(f"mixed_{cfg.mixed_precision}")

    strategy = distribute.make_strategy(cfg.strategy, cfg.cpu_devices, cfg.tpu)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise config.UsageError(f"--batch_size {cfg.batch_size} is not divisible by the {replicas} replicas")
    steps_per_epoch = source.num_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise config.UsageError(f"--batch_size {cfg.batch_size} is larger than the training set "
                                f"({source.num_train} images)")
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs

    from cmsf_tf.methods import METHODS
    if METHODS[cfg.method].needs_labels and not source.has_train_labels():
        raise config.UsageError(f"{source.no_labels_reason(cfg.dataset, '--method=' + cfg.method)}; "
                                "train a self-supervised method (byol, msf, cmsf_2q, cmsf_km)")
    jit_compile = distribute.resolve_jit_compile(cfg.jit_compile, cfg.strategy, cfg.deterministic)
    with strategy.scope():
        model = build_model(cfg, sync_bn=replicas > 1, num_images=source.num_train, num_classes=source.num_classes)
        optimizer = keras.optimizers.SGD(
            learning_rate_schedule(cfg, total_steps, steps_per_epoch), momentum=cfg.momentum)
        model.compile(optimizer=optimizer, jit_compile=jit_compile)
    if bool(model.jit_compile) != jit_compile:  # Keras turns XLA off, with a warning only, for models it deems unfit
        raise config.UsageError(f"--jit_compile={cfg.jit_compile}: Keras declined to compile this model with XLA")
    if jit_compile:
        log("XLA: the train step, the epoch-end clustering, pseudo-label head and k-NN features are compiled")

    # Multi-worker: every worker must take part in saving (it is a collective), but only the chief
    # writes into --model_dir; the others save into a throwaway directory and restore from the chief's.
    chief = distribute.is_chief(strategy)
    run_dir = rundir.RunDir(cfg.model_dir)
    checkpoint_dir = run_dir.checkpoints
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    if chief:
        removed = rundir.remove_orphans(checkpoint_dir)
        if removed:
            log(f"removed the partial files of an interrupted save: {', '.join(removed)}")
    latest = rundir.usable_checkpoint(checkpoint_dir, log, repair=chief)
    from cmsf_tf import convert

    try:
        imported = convert.imported_checkpoint(cfg.model_dir)
        if latest and imported and os.path.abspath(latest) == os.path.abspath(imported):
            # A directory written by convert from_torch: its checkpoint holds weights, not a run's state.
            convert.init_model(model, latest, log)
        elif latest:
            checkpoint.restore(latest).assert_existing_objects_matched()
        elif cfg.init_from:
            convert.init_model(model, cfg.init_from, log)
    except convert.ConvertError as e:
        raise config.UsageError(f"--init_from: {e}" if not latest else str(e)) from None
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir if chief else tempfile.mkdtemp(), max_to_keep=3)
    step = global_step(model)
    result_path = run_dir.result_path
    if step >= total_steps and os.path.isfile(result_path):
        log(f"the run in {cfg.model_dir} is finished (step {step} of {total_steps}); {result_path} is unchanged "
            "(raise --epochs to train on, or use another --model_dir)")
        with open(result_path) as f:
            return json.load(f)
    if step:
        epoch, done = divmod(step, steps_per_epoch)
        # fit_epochs finishes a part-done epoch in a model.fit of its own, which Keras's progress line counts
        # as the last epoch ("Epoch 5/5" in a 20-epoch run): say so, lest it read as the end of training.
        rest = ""
        if done and epoch + 1 < cfg.epochs:
            after = f"epoch {cfg.epochs}" if epoch + 2 == cfg.epochs else f"epochs {epoch + 2}-{cfg.epochs}"
            rest = (f"; Keras shows the rest of epoch {epoch + 1} as 'Epoch {epoch + 1}/{epoch + 1}', then {after} "
                    f"as 'Epoch n/{cfg.epochs}'")
        log(f"resumed from {latest} (step {step}, epoch {epoch + 1} of {cfg.epochs}){rest}")

    guard = DivergenceGuard()
    saver = CheckpointSaver(manager, every=cfg.checkpoint_steps, stop_after=cfg.stop_after_steps, saved_step=step)
    from cmsf_tf.callbacks import monitor

    logdir = run_dir.tensorboard
    callbacks = [guard]
    # The method's own callbacks (k-means, pseudo-label head) run before the saver: the checkpoint holds their work.
    callbacks += METHODS[cfg.method].training_callbacks(cfg, steps_per_epoch=steps_per_epoch,
                                                        logdir=logdir if chief else None, log=log,
                                                        jit_compile=jit_compile)
    callbacks.append(saver)
    stopper = saver
    if distribute.is_multi_worker(strategy):  # right after the saver: the step's work is done when it saves
        from cmsf_tf.callbacks.preemption import CoordinatedStop

        stopper = CoordinatedStop(strategy.cluster_resolver, saver)
        callbacks.append(stopper)
    if chief and cfg.knn_eval and cfg.knn_every:  # after the saver: a kill while it measures loses no training
        callbacks.append(monitor.KnnMonitor(
            cfg.knn_every, source.knn_source(), cfg.image_size, cfg.eval_batch_size, steps_per_epoch, cfg.epochs,
            queries=cfg.knn_every_queries, index=cfg.knn_every_index, logdir=logdir,
            curve_path=run_dir.knn_curve, log=log, jit_compile=jit_compile))
    # On every worker: reading the rank histogram (an on-read metric variable) is a collective across
    # workers under MultiWorkerMirroredStrategy; only the chief writes it.
    callbacks.append(monitor.RankHistograms(logdir if chief else None,
                                            run_dir.rank_histograms if chief else None))
    if chief:
        callbacks.append(ScalarSummaries(logdir, cfg.log_steps, cfg.batch_size))
    timer = (monitor.TrainingTime(run_dir.training_time, step,
                                  cpu_kernels="onednn" if distribute.onednn_on() else "eigen") if chief else None)
    if timer is not None:  # last: an epoch's seconds include the epoch-end work before it
        callbacks.append(timer)

    from cmsf_tf.callbacks.preemption import Preempted

    try:
        with stop_signals(stopper, log):
            step = fit_epochs(cfg, model, strategy, source, labels, callbacks, saver, step, steps_per_epoch,
                              total_steps, checkpoint_dir)
    except Preempted as e:
        reason = stopper.stop_reason or "another worker's stop (SIGTERM or Ctrl-C)"
        log(f"stopped by {reason}: every worker saved step {e.args[0]} of {total_steps} "
            f"({tf.train.latest_checkpoint(checkpoint_dir)}); run the same command on every worker to resume")
        raise Interrupted(stopper.stop_reason or "SIGTERM") from None
    finally:
        if stopper is not saver:
            stopper.close()
        if timer is not None:
            timer.record(global_step(model))

    if saver.stop_reason:
        log(f"stopped by {saver.stop_reason} at step {step} of {total_steps} with a checkpoint "
            f"({tf.train.latest_checkpoint(checkpoint_dir)}); run the same command again to resume")
        raise Interrupted(saver.stop_reason)
    if saver.stopped_early or step < total_steps:
        log(f"stopped at step {step} of {total_steps}; run the same command again to resume")
        return None
    if not chief:
        return None

    result = {"method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs,
              "steps": step, "jit_compile": jit_compile}
    if step > timer.first_step:  # the chief's: only the chief gets here
        result["train_images_per_s"] = round((step - timer.first_step) * cfg.batch_size / max(timer.seconds, 1e-9), 1)
    result.update(monitor.training_time(monitor.read_jsonl(run_dir.training_time, key="stretch")))

    knn_data = source.knn_source()
    if knn_data is not source and knn_data is not None:
        log(f"{cfg.dataset}'s training images have no labels: k-NN uses the labelled val/ split "
            f"({knn_data.num_train} images as the index, {knn_data.num_test} as queries)")
    if cfg.knn_eval and knn_data is None:
        log(f"no k-NN evaluation: {source.no_labels_reason(cfg.dataset, 'it')}")
    elif cfg.knn_eval:
        result.update(knn_evaluation(model.online_backbone, knn_data, cfg, log, strategy, jit_compile))
    curve = monitor.read_jsonl(run_dir.knn_curve)
    if curve:
        result["knn_curve"] = curve
    if cfg.knn_baselines and knn_data is not None:
        with strategy.scope():
            untrained = build_model(cfg, sync_bn=False, num_images=source.num_train, num_classes=source.num_classes)
        result["baselines"] = {
            "untrained": knn_evaluation(untrained.online_backbone, knn_data, cfg, log, strategy, jit_compile),
        }
        if source.pixel_arrays() is not None:
            result["baselines"]["raw_pixels"] = raw_pixel_knn(source, probe_seed(cfg))
    result["wall_time_s"] = round(time.time() - started, 1)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def probe_seed(cfg):
    """The seed of the final linear probe, or None without --final_linear_probe (knn.split_knn's argument)."""
    return cfg.seed if cfg.final_linear_probe else None


def knn_evaluation(encoder, source, cfg, log, strategy, jit_compile=False):
    from cmsf_tf.callbacks import monitor
    from cmsf_tf.eval import knn

    log("k-NN evaluation on the test split ...")
    features = monitor.feature_function(encoder, strategy, jit_compile)
    result, _, _ = knn.split_knn(features, source, cfg.image_size, cfg.eval_batch_size,
                                 probe_seed=probe_seed(cfg))
    return result


def raw_pixel_knn(source, probe_seed=None):
    """Cosine k-NN on the raw pixels: the floor a learned representation has to beat (with a `probe_seed`,
    also the linear probe's, as split_knn)."""
    import numpy as np

    from cmsf_tf.eval import knn, linear, spectrum

    def flat(images):
        x = images.reshape(len(images), -1).astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    index = flat(source.train_images)
    result = knn.knn_accuracy(index, source.train_labels, flat(source.test_images), source.test_labels,
                              ks=(1, 20), num_classes=source.num_classes)
    result["rankme"] = round(spectrum.rankme(index), 2)
    if probe_seed is not None:
        result["linear_top1"] = linear.cached_probe_top1(index, source.train_labels, flat(source.test_images),
                                                         source.test_labels, source.num_classes, seed=probe_seed)
    return result


# What each column of the printed table measures: one line under the table.
COLUMN_NOTES = {"20-NN": "20-NN / 1-NN: the nearest training images vote", "linear": "linear: a linear classifier "
                "on the frozen features", "RankMe": "RankMe: feature directions in use"}


def summary_lines(result):
    """The printed table of a result dict: one row each for the trained network and its baselines
    (untrained, raw pixels), columns 20-NN, 1-NN, linear (with --final_linear_probe) and RankMe on the
    test split, and a line per column saying what it measures."""
    rows = [(f"trained ({result['method']}, {result['epochs']} epochs)", result)]
    rows += [(name.replace("_", " "), r) for name, r in result.get("baselines", {}).items()]
    rows = [(name, r) for name, r in rows if "knn_top1_k20" in r]
    if not rows:
        return []
    columns = [("20-NN", "knn_top1_k20", True), ("1-NN", "knn_top1_k1", True)]
    columns += [(title, key, key == "linear_top1") for title, key in (("linear", "linear_top1"), ("RankMe", "rankme"))
                if any(key in r for _, r in rows)]

    def cell(r, key, percent):
        if key not in r:
            return " " * 8
        return f"{100 * r[key]:7.1f}%" if percent else f"{r[key]:8.1f}"

    lines = ["Top-1 on the test split".ljust(32) + "".join(f"{title:>8}" for title, _, _ in columns)]
    lines += [f"  {name:<30}" + "".join(cell(r, key, percent) for _, key, percent in columns) for name, r in rows]
    return lines + ["  " + "; ".join(COLUMN_NOTES[title] for title, _, _ in columns if title in COLUMN_NOTES) + "."]


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}; flags look like --name=value",
              file=sys.stderr)
        sys.exit(2)
    try:
        result = run(config.from_flags())
    except Interrupted as e:
        sys.exit(143 if str(e) == "SIGTERM" else 130)
    except KeyboardInterrupt:
        print("interrupted without saving (Ctrl-C before training started, or twice); the newest checkpoint in "
              "--model_dir is the last one saved: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    if result is not None:
        print(json.dumps(result, indent=2))
        print("\n".join(summary_lines(result)))


def cli():
    """The `cmsf-train` console script: `python -m cmsf_tf.train`."""
    config.run_entry_point(main, "train")


if __name__ == "__main__":
    cli()

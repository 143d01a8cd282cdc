"""The run directory (--model_dir): its layout, one run at a time, readable flags, and checkpoints never lost.

- `RunDir`: the one owner of the layout. Every module asks it where a run keeps a thing (flags.json,
  checkpoints/, tensorboard/, eval/, result.json, the lock, the k-NN curve, ...) and it alone reads
  flags.json (with renamed settings upgraded); nobody else joins a path onto --model_dir.

- `lock`: an exclusive `fcntl.flock` on `<model_dir>/.lock`, held for the life of the process. The kernel
  drops it when the process ends, however it ends (kill -9 included), so a stale lock cannot exist.
- `usable_checkpoint`: the newest checkpoint that reads back whole and finite. Newer damaged ones
  (missing or truncated files, garbage in the `checkpoint` state file, non-finite values) are moved to
  `checkpoints/damaged/` with a line saying why, so CheckpointManager's rotation never deletes the
  good ones to keep the bad. A directory with checkpoint files of which none reads is an error, never
  a fresh start.
- `remove_orphans`: half-written files of an interrupted or failed save (`ckpt-N_temp/`, `*.tempstate*`).
"""

import fcntl
import glob
import json
import os
import re
import shutil

import numpy as np

from cmsf_tf.errors import UserError

_CKPT = re.compile(r"^ckpt-(\d+)(?:\.index|\.data-\d+-of-\d+)$")


class RunDirError(UserError):
    """A problem with --model_dir, said in one sentence."""


# Settings renamed since: old name -> new name. The old flag stays an alias (config.define_flags); a run
# directory written with the old name reads as the new one (RunDir.flags).
RENAMED = {"sup_bank_size": "labelled_cache_size"}


def upgrade_flags(saved):
    """A run's flags.json dict with renamed settings under their current names."""
    return {RENAMED.get(name, name): value for name, value in saved.items()}


class RunDir:
    """Where a run keeps each thing (paths only: nothing is created by asking)."""

    FLAGS = "flags.json"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tensorboard"
    EVAL = "eval"
    RESULT = "result.json"
    LOCK = ".lock"
    IMPORTED = "imported.json"  # written by convert from_torch: the run holds converted weights
    KNN_CURVE = "knn_curve.jsonl"  # the --knn_every curve, one JSON line per measurement
    RANK_HISTOGRAMS = "constrained_ranks.jsonl"  # per-epoch histograms of the constrained neighbours' ranks
    TRAINING_TIME = "training_time.jsonl"  # each process's training seconds (monitor.TrainingTime)

    def __init__(self, path):
        self.path = path

    def __repr__(self):
        return f"RunDir({self.path!r})"

    def _join(self, *parts):
        return os.path.join(self.path, *parts)

    flags_path = property(lambda self: self._join(self.FLAGS))
    checkpoints = property(lambda self: self._join(self.CHECKPOINTS))
    tensorboard = property(lambda self: self._join(self.TENSORBOARD))
    eval_dir = property(lambda self: self._join(self.EVAL))
    result_path = property(lambda self: self._join(self.RESULT))
    lock_path = property(lambda self: self._join(self.LOCK))
    imported_path = property(lambda self: self._join(self.IMPORTED))
    knn_curve = property(lambda self: self._join(self.KNN_CURVE))
    rank_histograms = property(lambda self: self._join(self.RANK_HISTOGRAMS))
    training_time = property(lambda self: self._join(self.TRAINING_TIME))
    features_dir = property(lambda self: self._join(self.EVAL, "features"))  # evaluate's cached features
    neighbours_png = property(lambda self: self._join(self.EVAL, "neighbours.png"))
    projector_dir = property(lambda self: self._join(self.TENSORBOARD, "projector"))
    eval_logdir = property(lambda self: self._join(self.TENSORBOARD, "eval"))
    study_dir = property(lambda self: self._join("study"))  # tools/reproduce_small.py's evaluations of the run

    def eval_result(self, protocol):
        """eval/<protocol>.json: what `evaluate PROTOCOL` wrote last."""
        return self._join(self.EVAL, f"{protocol}.json")

    def checkpoint(self, name):
        """checkpoints/<name>: a checkpoint prefix by its file name (ckpt-N)."""
        return self._join(self.CHECKPOINTS, name)

    def is_run(self):
        """Whether a training (or convert from_torch) wrote here: it has flags.json."""
        return os.path.isfile(self.flags_path)

    def flags(self):
        """The run's settings from flags.json, renamed settings under their current names; None when
        there is no flags.json; RunDirError naming the file when it is damaged."""
        if not self.is_run():
            return None
        return upgrade_flags(read_flags(self.flags_path))

    def write_flags(self, values):
        write_flags(self.flags_path, values)

    def lock(self):
        return lock(self.path)

    def discard_unstarted(self, created):
        """Removes flags.json and the lock when the directory holds nothing else (a run refused before its
        first step), and the directory too if that run created it. Returns whether it removed them;
        a directory with anything more (checkpoints, TensorBoard files, a user's file) is left whole."""
        ours = {self.FLAGS, self.LOCK}
        try:
            names = set(os.listdir(self.path))
        except OSError:
            return False
        if not names <= ours:
            return False
        for name in names:
            os.remove(self._join(name))
        if created:
            try:
                os.rmdir(self.path)
            except OSError:  # something appeared meanwhile: keep it
                pass
        return True


def lock(model_dir):
    """Takes the run directory's exclusive lock; returns the open lock file (keep it open)."""
    path = RunDir(model_dir).lock_path
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirError(f"--model_dir {model_dir} is in use by another run ({holder}); wait for it to finish "
                          "or use another --model_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
    handle.flush()
    return handle


def read_flags(path):
    """The dict in a run's flags.json; RunDirError naming the file when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is damaged ({e}); restore it, or remove it to start a new run in that "
                          "directory") from None


def write_flags(path, flags):
    """Writes flags.json through a temporary file and a rename, so readers never see half of it."""
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(flags, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def remove_orphans(checkpoint_dir):
    """Deletes the temporary files a save leaves when it fails or is killed; returns their names."""
    orphans = glob.glob(os.path.join(checkpoint_dir, "ckpt-*_temp*")) + glob.glob(
        os.path.join(checkpoint_dir, "*.tempstate*"))
    for path in orphans:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return sorted(os.path.basename(p) for p in orphans)


def checkpoint_prefixes(checkpoint_dir):
    """Prefixes (`.../ckpt-N`) of every checkpoint with any file in the directory, newest first."""
    numbers = set()
    for name in os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else ():
        match = _CKPT.match(name)
        if match:
            numbers.add(int(match.group(1)))
    return [os.path.join(checkpoint_dir, f"ckpt-{n}") for n in sorted(numbers, reverse=True)]


def problem(prefix):
    """None if the checkpoint reads back whole with finite values; else why not, in a few words."""
    import tensorflow as tf

    if not os.path.exists(prefix + ".index"):
        return "its .index file is missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in sorted(reader.get_variable_to_shape_map()):
            value = reader.get_tensor(name)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                return f"it holds non-finite values ({name})"
    except Exception as e:  # noqa: BLE001 (a damaged file fails in many ways: OpError, IndexError, ValueError, ...)
        message = (getattr(e, "message", None) or str(e) or type(e).__name__).strip().splitlines()[0]
        return f"it cannot be read ({message[:200]})"
    return None


def usable_checkpoint(checkpoint_dir, log=print, repair=True):
    """The prefix to resume from (None for a directory without checkpoints). With `repair` (the process
    that owns the directory) newer damaged checkpoints are moved aside and the state file is rewritten
    to list the good ones."""
    import tensorflow as tf

    prefixes = checkpoint_prefixes(checkpoint_dir)
    if not prefixes:
        return None
    damaged = []
    for prefix in prefixes:
        why = problem(prefix)
        if why is None:
            break
        damaged.append((prefix, why))
    else:
        newest, why = damaged[0]
        raise RunDirError(f"{checkpoint_dir} holds checkpoints but none can be restored ({os.path.basename(newest)}: "
                          f"{why}); move that directory away to start the run afresh")
    if not repair:
        return prefix
    aside = os.path.join(checkpoint_dir, "damaged")
    for bad, why in damaged:
        os.makedirs(aside, exist_ok=True)
        for path in glob.glob(bad + ".*"):
            shutil.move(path, os.path.join(aside, os.path.basename(path)))
        log(f"warning: skipped {os.path.basename(bad)}: {why}; moved it to {aside}")
    good = [p for p in prefixes if p not in dict(damaged)]
    try:
        listed = tf.train.latest_checkpoint(checkpoint_dir)
    except (tf.errors.OpError, ValueError):  # a state file that is not a CheckpointState text proto
        listed = None
    if damaged or listed != prefix:
        # The state file lists what CheckpointManager keeps and rotates: make it the readable ones.
        # With their times, as CheckpointManager writes them: entries without one count as "preserved" and
        # would never be rotated away.
        kept = list(reversed(good))
        times = [os.path.getmtime(p + ".index") if os.path.exists(p + ".index") else 0.0 for p in kept]
        tf.__internal__.train.update_checkpoint_state(
            checkpoint_dir, prefix, all_model_checkpoint_paths=kept, save_relative_paths=True,
            all_model_checkpoint_timestamps=times, last_preserved_timestamp=min(times) - 1)
        if not damaged:
            log(f"warning: {os.path.join(checkpoint_dir, 'checkpoint')} did not name {os.path.basename(prefix)}; "
                "rewrote it")
    return prefix

"""Checkpointing, divergence and stop-point callbacks. Step numbers count batches trained on."""

import math

import keras
import numpy as np
import tensorflow as tf


def global_step(model):
    """Batches trained on so far (`MeanShift.train_steps`). `.numpy()`: int() refuses a MirroredVariable."""
    return int(model.train_steps.numpy())


def log_value(value):
    """A log entry as a Python float (multi-worker runs log one-element vectors)."""
    return float(np.asarray(value).item())


class Diverged(Exception):
    """The loss stopped being finite."""


class DivergenceGuard(keras.callbacks.Callback):
    """Stops at the first step whose loss is NaN or Inf, before anything saves the broken weights.

    Must come before CheckpointSaver in the callback list."""

    def on_train_batch_end(self, batch, logs=None):
        loss = log_value((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at step {global_step(self.model)}")


class SaveFailed(Exception):
    """A checkpoint could not be written (disk full, permissions); its partial files are removed."""


def non_finite_variables(variables):
    """Paths of the floating-point variables holding NaN or Inf (weights, BatchNorm statistics, banks,
    optimizer slots): a state that must never be saved."""
    bad = []
    for v in variables:
        if tf.as_dtype(v.dtype).is_floating and not bool(tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))):
            bad.append(getattr(v, "path", v.name))
    return bad


class CheckpointSaver(keras.callbacks.Callback):
    """Saves every `every` steps and at each epoch end; stops the run once `stop_after` steps are done,
    or at the next step boundary after `request_stop` (SIGTERM, Ctrl-C). Refuses to save a state that is
    not finite (raises Diverged), and cleans up after a failed save (raises SaveFailed)."""

    def __init__(self, manager, every=0, stop_after=0, saved_step=-1, variables=None):
        super().__init__()
        self.manager = manager
        self.saved_step = saved_step
        self.every = every
        self.stop_after = stop_after
        self.stopped_early = False
        self.stop_reason = None
        self._variables = variables

    def request_stop(self, reason):
        self.stop_reason = reason

    def save_now(self):
        """Saves the state of the current step (once per step)."""
        from cmsf_tf import rundir

        step = global_step(self.model)
        if step == self.saved_step:
            return
        variables = self._variables if self._variables is not None else (
            list(self.model.weights) + list(self.model.optimizer.variables))
        bad = non_finite_variables(variables)
        if bad:
            raise Diverged(f"the state after step {step} is not finite ({', '.join(bad[:3])})")
        try:
            self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            rundir.remove_orphans(self.manager.directory)
            reason = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
            raise SaveFailed(f"could not write checkpoint ckpt-{step} to {self.manager.directory} "
                             f"({reason.strip().splitlines()[-1][:200]})") from None
        self.saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if self.every and step % self.every == 0:
            self.save_now()
        if (self.stop_after and step >= self.stop_after) or self.stop_reason:
            self.save_now()
            self.stopped_early = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.save_now()

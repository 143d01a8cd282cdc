"""Checkpointing, divergence and stop-point callbacks. Step numbers count batches trained on."""

import math

import keras
import numpy as np


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


class CheckpointSaver(keras.callbacks.Callback):
    """Saves every `every` steps and at each epoch end; stops the run once `stop_after` steps are done."""

    def __init__(self, manager, every=0, stop_after=0, saved_step=-1):
        super().__init__()
        self.manager = manager
        self.saved_step = saved_step
        self.every = every
        self.stop_after = stop_after
        self.stopped_early = False

    def _save(self):
        step = global_step(self.model)
        if step != self.saved_step:
            self.manager.save(checkpoint_number=step)
            self.saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if self.every and step % self.every == 0:
            self._save()
        if self.stop_after and step >= self.stop_after:
            self._save()
            self.stopped_early = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self._save()

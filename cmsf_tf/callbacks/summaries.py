"""TensorBoard scalars keyed by the global step, so a resumed run continues its curves."""

import time

import keras
import tensorflow as tf

from cmsf_tf.callbacks.checkpoint import global_step, log_value


class ScalarSummaries(keras.callbacks.Callback):
    """Writes `train/<metric>` every `every` steps and `epoch/<metric>` at each epoch end, plus the
    measured training throughput (`train/images_per_sec`)."""

    def __init__(self, logdir, every, global_batch):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir)
        self.every = max(int(every), 1)
        self.global_batch = global_batch
        self._last = None

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if step % self.every:
            return
        now = time.perf_counter()
        with self.writer.as_default(step=step):
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"train/{name}", log_value(value))
            if self._last is not None and step > self._last[0]:
                rate = (step - self._last[0]) * self.global_batch / (now - self._last[1])
                tf.summary.scalar("train/images_per_sec", rate)
        self._last = (step, now)

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default(step=epoch + 1):
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"epoch/{name}", log_value(value))
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.flush()

"""Coordinated stop of a multi-worker run: when any worker is asked to stop (SIGTERM, Ctrl-C), every
worker saves one checkpoint at the same step and stops.

A worker cannot stop alone: its peers would block in the next step's collectives and die on lost
heartbeats, and a checkpoint is itself a collective (every worker takes part in saving). TensorFlow's
`PreemptionCheckpointHandler` agrees on the step through the coordination service that
MultiWorkerMirroredStrategy already runs: the worker that was signalled publishes "save after step
n+1" and waits until every worker has acknowledged it; each worker saves when it reaches that step.
We hand it our own pieces: the signal arrives through `request_stop` (the train command's signal
handler, so the handler does not replace ours), the save is `CheckpointSaver.save_now` (the finite-state
check, the run's CheckpointManager and its clean-up on failure) and the exit raises `Preempted`, which
the command turns into exit status 143.
"""

import tempfile
import threading

import keras
import tensorflow as tf

from cmsf_tf.callbacks.checkpoint import global_step


class Preempted(Exception):
    """Every worker saved the checkpoint of step `args[0]` and stops."""


class CoordinatedStop(keras.callbacks.Callback):
    """Checks once per step whether any worker was asked to stop; if so, saves with `saver` on every
    worker at the agreed step and raises Preempted. Put it after the CheckpointSaver."""

    def __init__(self, cluster_resolver, saver):
        super().__init__()
        self.stop_reason = None  # set on the worker that received the signal only
        self._requested = threading.Event()
        termination = tf.distribute.experimental.TerminationConfig(
            termination_watcher_fn=self._requested.is_set,  # polled once a second by the handler's thread
            exit_fn=self._raise, grace_period=0, save_fn=saver.save_now)
        # The handler counts its calls in a variable of the Checkpoint it is given and restores that count
        # from its directory. Given an empty Checkpoint in a directory of its own, every worker starts at
        # 0 when it builds the handler and calls it once per step, so the counts agree on every worker,
        # fresh or resumed; the run's own checkpoints stay free of the handler's variable.
        counter = tf.train.CheckpointManager(tf.train.Checkpoint(), tempfile.mkdtemp(prefix="cmsf_stop_"), 1)
        self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            cluster_resolver, counter, termination_config=termination)

    def request_stop(self, reason):
        """Called from the signal handler: the handler's thread tells the other workers."""
        self.stop_reason = reason
        self._requested.set()

    def _raise(self):
        raise Preempted(global_step(self.model))

    def on_train_batch_end(self, batch, logs=None):
        try:
            self._handler.save_checkpoint_if_preempted()
        except tf.errors.AlreadyExistsError:
            # A worker that finished its last step has closed the handler (see close) while this one was
            # announcing a stop: the run is complete, there is nothing left to save.
            pass

    def close(self):
        """Stops the handler's watcher threads (also on the peers' side: they are told no stop will come)."""
        if self._handler is not None:
            # The handler's own clean-up (its __del__, which would otherwise wait for garbage collection:
            # its threads keep it referenced).
            self._handler.__del__()
            self._handler = None

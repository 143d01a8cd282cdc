"""CMSF-Pseudo's pseudo-label head training, at the middle and at the end of every epoch.

Each round continues from the head's current weights with a fresh optimizer state: SGD (momentum 0.9,
weight decay 1e-4 on every parameter as PyTorch's SGD applies it) for `epochs` passes over the labelled
cache, learning rate divided by 10 at each milestone epoch. The paper's code (semi_supervised/
pseudo_label_train.py `train_pseudo_lbl`, run with --pseudo_lbl_epochs 10 --pseudo_lbl_lr_schedule
'15,30,40') never reaches a milestone, so the lr stays 0.01: the defaults here. The
round trains a copy of the head outside the distribution strategy on the default (training) device,
then writes the weights back, which mirrors them to every replica; the copy sees the same cached rows
whatever the number of replicas, so N replicas get the single device's head. Rounds fire on the global
step (step % steps_per_epoch in {steps_per_epoch // 2, 0}), so a resumed run fires exactly where the
uninterrupted one did, and the data order of a round is a function of (seed, step). Must run before
the checkpoint saver, so the saved head is the trained one.
"""

import keras
import tensorflow as tf

from cmsf_tf.callbacks.checkpoint import global_step
from cmsf_tf.head_training import TorchSGD, cached_batches, fit_head, step_schedule


def train_head(head, features, labels, epochs, lr, milestones=(), batch_size=256, seed=0, momentum=0.9,
               weight_decay=1e-4, jit_compile=False):
    """Trains the keras `head` in place on (features, labels); returns its final-pass training top-1.
    `jit_compile`: the step compiled with XLA (one compilation per batch shape: the full and the last)."""
    steps = -(-len(features) // batch_size)
    optimizer = TorchSGD(step_schedule(lr, [m for m in milestones if 0 < m < epochs], steps),
                                     momentum=momentum)

    def step_loss(x, y):  # reports the batch's correct rows; coupled L2 on every parameter (torch.optim.SGD)
        logits = tf.cast(head(x, training=True), tf.float32)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return loss, tf.reduce_sum(tf.cast(tf.argmax(logits, -1, output_type=tf.int32) == y, tf.float32))

    batches = cached_batches(features, labels, batch_size, seed)
    # BatchNorm needs two rows: a last batch of one is skipped.
    correct = fit_head(step_loss, [(optimizer, head.trainable_variables)],
                       lambda epoch: ((tf.constant(x), tf.constant(y)) for x, y in batches(epoch) if len(x) >= 2),
                       epochs, weight_decay, jit_compile=jit_compile)
    return sum(correct) / max(len(features), 1)


class PseudoLabelTrainer(keras.callbacks.Callback):
    def __init__(self, steps_per_epoch, epochs=10, lr=0.01, milestones=(15, 30, 40), batch_size=256, seed=0,
                 logdir=None, log=print, weight_decay=1e-4, jit_compile=False):
        super().__init__()
        self.jit_compile = jit_compile
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs, self.lr, self.milestones, self.batch_size, self.seed = epochs, lr, tuple(milestones), batch_size, seed
        self.weight_decay = weight_decay
        self.writer = tf.summary.create_file_writer(logdir) if logdir else None
        self.log = log
        self._copy = None

    def _due(self, step):
        phase = step % self.steps_per_epoch
        return step > 0 and (phase == 0 or (self.steps_per_epoch >= 2 and phase == self.steps_per_epoch // 2))

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if not self._due(step):
            return
        features, labels = self.model.labelled_cache.contents()
        if len(features) < 2:
            self.log(f"cmsf_pseudo: step {step}: fewer than 2 cached labelled images, head not trained")
            return
        if self._copy is None:  # built outside the strategy: plain variables on the default device
            config = self.model.pseudo_head.get_config()
            self._copy = keras.Model.from_config(config)
        self._copy.set_weights(self.model.pseudo_head.get_weights())
        accuracy = train_head(self._copy, features, labels, self.epochs, self.lr, self.milestones, self.batch_size,
                              seed=self.seed * 1_000_003 + step, weight_decay=self.weight_decay,
                              jit_compile=self.jit_compile)
        self.model.pseudo_head.set_weights(self._copy.get_weights())
        if logs is not None:
            logs["head_train_top1"] = accuracy
        if self.writer is not None:
            with self.writer.as_default(step=step):
                tf.summary.scalar("pseudo/head_train_top1", accuracy)
                tf.summary.scalar("pseudo/cached_rows", float(len(features)))
            self.writer.flush()


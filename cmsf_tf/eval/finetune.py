"""Fine-tuning: the whole backbone and a new linear head on the labelled subset (semi-supervised protocol).

Paper recipe: 20 epochs, SGD momentum 0.9, backbone lr 0.001; the freshly initialised head learns at
--finetune_head_lr (0.01 by default: at 0.001 a zero-initialised head barely moves in 20 epochs), both
decayed with a cosine schedule. Training views: random resized crop (scale 0.08-1, the supervised
setting; --finetune_crop_min_scale) + flip; BatchNorm in training mode; evaluation on centre crops.
"""

import keras
import numpy as np
import tensorflow as tf

from cmsf_tf.eval.linear import top_k_accuracy
from cmsf_tf.head_training import TorchSGD, fit_head


def finetune(backbone, feature_dim, num_classes, batches, steps_per_epoch, epochs=20, lr=0.001, head_lr=0.01,
             momentum=0.9, weight_decay=0.0, log=None):
    """Trains `backbone` (in place) and a new head; returns (head keras layer, per-epoch mean losses).
    `batches(epoch)` yields (images [B, S, S, 3] normalised, labels [B]) of the labelled subset."""
    head = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="finetune_head")
    head.build((None, feature_dim))
    total = max(epochs * steps_per_epoch, 1)
    opt_backbone = TorchSGD(keras.optimizers.schedules.CosineDecay(lr, total), momentum=momentum)
    opt_head = TorchSGD(keras.optimizers.schedules.CosineDecay(head_lr, total), momentum=momentum)

    def step_loss(images, labels):
        logits = head(tf.cast(backbone(images, training=True), tf.float32))
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return ce, ce

    history = []

    def epoch_end(epoch, losses):
        history.append(float(np.mean(losses)) if losses else float("nan"))
        if log:
            log(f"  fine-tune epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}")

    fit_head(step_loss, [(opt_backbone, backbone.trainable_variables), (opt_head, head.trainable_variables)],
             lambda epoch: ((images, tf.cast(labels, tf.int32)) for images, labels in batches(epoch)),
             epochs, weight_decay, on_epoch_end=epoch_end)
    return head, history


def evaluate(backbone, head, batches):
    """{top1, top5} of backbone + head on (images, labels) eval batches."""
    return accuracy(tf.function(lambda x: head(tf.cast(backbone(x, training=False), tf.float32))), batches)


def accuracy(predict, batches):
    """{top1, top5} of `predict` (images -> class scores) on (images, labels) eval batches."""
    logits, labels = [], []
    for images, batch_labels in batches:
        logits.append(predict(images).numpy())
        labels.append(np.asarray(batch_labels))
    return top_k_accuracy(np.concatenate(logits), np.concatenate(labels))

"""The paper's semi-supervised evaluation (1% / 10% labels): a frozen backbone and an MLP head.

As semi_supervised/eval_linear.py --fine-tune of the paper's code, run by run_semisup_fullprecision.sh:
the backbone gets no gradient (its forward pass is under torch.no_grad), but it is in training mode, so
its BatchNorm layers normalise with batch statistics and update their moving averages on the labelled
views. The head is L2 normalisation -> standardisation with the labelled images' centre-crop feature mean
and variance (FullBatchNorm) -> Linear(c, c) -> BatchNorm -> ReLU -> Linear(c, classes), trained on the
labelled subset with SGD (momentum 0.9, lr 0.001, weight decay 1e-4 on every head parameter, lr x0.1 at
epochs 15, 35, 50, of which 20 epochs reach only 15), batch 256, random resized crop (0.08-1) + flip.
The test split is evaluated (centre crops, inference mode) after every epoch; the script reports the
best epoch, chosen on the test split.
"""

import numpy as np
import tensorflow as tf

from cmsf_tf.eval import finetune, linear
from cmsf_tf.head_training import TorchSGD, fit_head
from cmsf_tf.models import heads


def train_and_evaluate(backbone, feature_dim, num_classes, stats, batches, test_batches, steps_per_epoch, epochs=20,
                       lr=0.001, milestones=(15, 35, 50), momentum=0.9, weight_decay=1e-4, seed=0, log=None):
    """Trains the head (the backbone's BatchNorm statistics move, its weights do not) and evaluates after
    every epoch. `batches(epoch)` yields (images, labels) of the labelled subset; `test_batches()` yields
    (images, labels) eval batches. Returns {top1, top5, top1_last, top5_last, best_epoch, top1_per_epoch,
    loss_per_epoch}."""
    import keras

    keras.utils.set_random_seed(seed)
    head = heads.mlp(feature_dim, feature_dim, num_classes, name="semi_head")
    mean, std = (tf.constant(s, tf.float32) for s in stats)
    optimizer = TorchSGD(linear.step_schedule(lr, [m for m in milestones if 0 < m < epochs],
                                                          steps_per_epoch), momentum=momentum)

    def embed(features):
        return (tf.math.l2_normalize(tf.cast(features, tf.float32), -1) - mean) / std

    def step_loss(images, labels):
        features = tf.stop_gradient(backbone(images, training=True))  # batch statistics, no gradient
        logits = head(embed(features), training=True)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return ce, ce

    predict = tf.function(lambda x: head(embed(backbone(x, training=False)), training=False))
    history, per_epoch = [], []

    def epoch_end(epoch, losses):
        history.append(float(np.mean(losses)) if losses else float("nan"))
        per_epoch.append(finetune.accuracy(predict, test_batches()))
        if log:
            log(f"  semi-supervised epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}, "
                f"test top-1 {100 * per_epoch[-1]['top1']:.2f}%")

    fit_head(step_loss, [(optimizer, head.trainable_variables)],
             lambda epoch: ((images, tf.cast(labels, tf.int32)) for images, labels in batches(epoch)),
             epochs, weight_decay, on_epoch_end=epoch_end)
    return summarize(per_epoch, history)


def summarize(per_epoch, losses=None):
    """Best epoch (the paper's number; chosen on the test split, first of equals) and last epoch."""
    best = int(np.argmax([r["top1"] for r in per_epoch]))
    out = {"top1": per_epoch[best]["top1"], "top1_last": per_epoch[-1]["top1"], "best_epoch": best + 1,
           "top1_per_epoch": [r["top1"] for r in per_epoch]}
    if "top5" in per_epoch[-1]:
        out.update(top5=per_epoch[best]["top5"], top5_last=per_epoch[-1]["top5"])
    if losses is not None:
        out["loss_per_epoch"] = list(losses)
    return out

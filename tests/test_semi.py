"""The paper's semi-supervised protocol (eval/semi.py) on a tiny backbone: what moves and what does not."""

import keras
import numpy as np
import tensorflow as tf

from cmsf_tf.eval import linear, semi
from cmsf_tf.models import backbones


def test_backbone_weights_stay_frozen_while_its_batchnorm_statistics_move_and_the_head_learns():
    keras.utils.set_random_seed(0)
    backbone = backbones.build_backbone("resnet18_small", 16, 3, 4, False, "backbone")
    dim = backbones.feature_dim("resnet18_small", 4)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 96).astype(np.int32)
    # Three classes of images that differ in brightness: a head on frozen random features can separate them.
    images = (rng.normal(size=(96, 16, 16, 3)) * 0.3 + (labels[:, None, None, None] - 1.0)).astype(np.float32)
    kernels = {v.path: v.numpy().copy() for v in backbone.trainable_variables}
    moving = {v.path: v.numpy().copy() for v in backbone.non_trainable_variables}
    stats = linear.standardizer(backbone(images, training=False).numpy())

    def batches(epoch):
        order = np.random.default_rng(epoch).permutation(96)
        for i in range(0, 96, 32):
            yield tf.constant(images[order[i:i + 32]]), tf.constant(labels[order[i:i + 32]])

    result = semi.train_and_evaluate(backbone, dim, 3, stats, batches, lambda: [(images, labels)],
                                     steps_per_epoch=3, epochs=8, lr=0.1, milestones=(6,), log=None)
    for v in backbone.trainable_variables:
        np.testing.assert_array_equal(v.numpy(), kernels[v.path])  # no gradient reaches the backbone
    assert any(not np.allclose(v.numpy(), moving[v.path]) for v in backbone.non_trainable_variables)
    assert result["loss_per_epoch"][-1] < 0.7 * result["loss_per_epoch"][0]
    # Chance is 1/3. Training uses batch statistics and testing the moving averages, so the accuracy on 96
    # images depends on the initial weights (0.81-0.88 over seeds alone, 0.57 after other tests drew from
    # Keras' global random state): the bar is well above chance, not a tuned number.
    assert result["top1"] == max(result["top1_per_epoch"]) and result["top1"] > 0.5
    assert result["top1_last"] == result["top1_per_epoch"][-1] and len(result["top1_per_epoch"]) == 8


def test_summary_reports_the_first_best_epoch_and_the_last():
    per_epoch = [{"top1": 0.5, "top5": 0.9}, {"top1": 0.7, "top5": 0.95}, {"top1": 0.7, "top5": 0.97},
                 {"top1": 0.6, "top5": 0.96}]
    out = semi.summarize(per_epoch)
    assert out["top1"] == 0.7 and out["best_epoch"] == 2 and out["top5"] == 0.95
    assert out["top1_last"] == 0.6 and out["top5_last"] == 0.96

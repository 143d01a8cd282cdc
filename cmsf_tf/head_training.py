"""What training a small head on in-memory features needs, shared by training (CMSF-Pseudo's pseudo-label
head, callbacks/pseudo_label.py) and evaluation (the linear probe and the semi-supervised head, eval/):
the step learning-rate schedule of the paper's heads and seeded batches over cached features.
"""

import keras
import numpy as np


def step_schedule(lr, milestones, steps_per_epoch):
    """lr, divided by 10 from the first step of each milestone epoch on (0-based epochs, as
    torch.optim.lr_scheduler.MultiStepLR stepped once per epoch). A Keras schedule over the optimizer's
    0-based step count; PiecewiseConstantDecay switches after a boundary, hence the - 1."""
    boundaries = [m * steps_per_epoch - 1 for m in milestones]
    if not boundaries:
        return lr
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [lr * 0.1 ** i for i in range(len(boundaries) + 1)])


def cached_batches(features, labels, batch_size, seed):
    """batches(epoch) over in-memory features, reshuffled each epoch (seeded), last partial batch kept."""
    features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)

    def batches(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(len(features))
        for i in range(0, len(order), batch_size):
            sel = order[i:i + batch_size]
            yield features[sel], labels[sel]
    return batches

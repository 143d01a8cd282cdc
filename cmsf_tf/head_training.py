"""What training a small head on in-memory features needs, shared by training (CMSF-Pseudo's pseudo-label
head, callbacks/pseudo_label.py) and evaluation (the linear probe and the semi-supervised head, eval/):
the step learning-rate schedule of the paper's heads and seeded batches over cached features.
"""

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="cmsf_tf")
class TorchSGD(keras.optimizers.SGD):
    """SGD with PyTorch's momentum: buf = momentum * buf + g, w -= lr * buf.

    Keras' SGD keeps velocity = momentum * velocity - lr * g instead. At a constant learning rate the two
    are the same; when the rate changes they part: Keras' velocity carries the old rate for the next ~10
    steps, PyTorch scales the whole buffer by the new one. Measured (tools/parity.py): a pseudo-label head
    round with a milestone inside ended 0.1 apart in its weights; with this optimizer, 3e-7. Used for the
    heads cmsf_tf trains from scratch (pseudo-label head, linear probe, semi-supervised head, fine-tuning),
    whose schedules have milestones; no checkpoint holds their optimizer state. (The main training keeps
    Keras' SGD, whose velocities its checkpoints hold: under a smooth per-step schedule Keras' update is
    PyTorch's with the learning rate of about momentum / (1 - momentum) = 9 steps earlier, i.e. the same
    cosine 9 steps late, against runs of thousands to a million steps.)"""

    def __init__(self, learning_rate=0.01, momentum=0.0, **kwargs):
        if kwargs.get("nesterov"):
            raise ValueError("TorchSGD has no Nesterov variant")
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = keras.ops.cast(learning_rate, variable.dtype)
        gradient = keras.ops.cast(gradient, variable.dtype)
        if self.momentum == 0:
            self.assign_sub(variable, keras.ops.multiply(gradient, learning_rate))
            return
        buf = self.momentums[self._get_variable_index(variable)]
        # PyTorch's first step sets buf = g, which momentum * 0 + g is.
        self.assign(buf, keras.ops.add(keras.ops.multiply(buf, keras.ops.cast(self.momentum, variable.dtype)),
                                       gradient))
        self.assign_sub(variable, keras.ops.multiply(buf, learning_rate))


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


def fit_head(step_loss, groups, batches, epochs, weight_decay=0.0, jit_compile=False, on_epoch_end=None):
    """The one training loop of the heads cmsf_tf trains (linear probe, semi-supervised head, fine-tuning,
    CMSF-Pseudo's pseudo-label head).

    `step_loss(x, y)` -> (loss, report): run under the gradient tape (a frozen backbone's forward pass
    belongs in it, under tf.stop_gradient); `report` is what the step returns (the batch's cross-entropy,
    a count of correct rows, ...). `groups`: [(optimizer, variables)], each optimizer applying its own
    variables' gradients of loss + ops.coupled_l2(every variable, weight_decay). `batches(epoch)` yields
    (x, y) tensors. After each epoch `on_epoch_end(epoch, reports)` gets the epoch's reports as floats.
    Returns the last epoch's reports."""
    import tensorflow as tf

    from cmsf_tf import ops

    variables = [v for _, group in groups for v in group]

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss, report = step_loss(x, y)
            if weight_decay:
                loss += ops.coupled_l2(variables, weight_decay)
        gradients = tape.gradient(loss, variables)
        start = 0
        for optimizer, group in groups:
            optimizer.apply_gradients(zip(gradients[start:start + len(group)], group))
            start += len(group)
        return report

    reports = []
    for epoch in range(epochs):
        reports = [float(step(x, y)) for x, y in batches(epoch)]
        if on_epoch_end is not None:
            on_epoch_end(epoch, reports)
    return reports

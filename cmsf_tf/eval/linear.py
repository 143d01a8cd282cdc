"""Linear evaluation on frozen features: the paper's probe and L2-regularised logistic regression.

Probe (MSF/CMSF protocol): features L2-normalised, then standardised with the training set's mean and
standard deviation; one linear layer trained with SGD (momentum 0.9, lr 0.01, 40 epochs, lr x0.1 at
epochs 15 and 30, batch 256) on cached features or on features of augmented views.
Logistic regression (transfer protocol): the same standardisation, full-batch training of a softmax
layer with an L2 penalty whose strength is chosen on a held-out part of the training set.
"""

import keras
import numpy as np
import tensorflow as tf


def standardizer(train_features, eps=1e-6):
    """(mean, std) of L2-normalised training features, per dimension."""
    x = _unit(train_features)
    return x.mean(axis=0), x.std(axis=0) + eps


def standardize(features, stats):
    mean, std = stats
    return ((_unit(features) - mean) / std).astype(np.float32)


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k_accuracy(logits, labels, ks=(1, 5)):
    """{f"top{k}": accuracy} of class scores [N, C]; ties go to the smaller class."""
    order = np.argsort(-np.asarray(logits), axis=1, kind="stable")
    labels = np.asarray(labels)
    return {f"top{k}": float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
            for k in ks if k == 1 or k < order.shape[1]}  # top-5 of 5 classes says nothing


class LinearHead:
    """W [D, C], b [C] as tf.Variables, with one SGD step compiled once."""

    def __init__(self, dim, num_classes, seed=0):
        init = tf.random.stateless_normal([dim, num_classes], seed=[seed, 0], stddev=0.01)
        self.w = tf.Variable(init, name="w")
        self.b = tf.Variable(tf.zeros([num_classes]), name="b")

    def logits(self, x):
        return tf.matmul(tf.convert_to_tensor(x, tf.float32), self.w) + self.b

    def predict(self, x, batch_size=4096):
        return np.concatenate([self.logits(x[i:i + batch_size]).numpy() for i in range(0, len(x), batch_size)])


def step_schedule(lr, milestones, steps_per_epoch):
    """lr, divided by 10 after each milestone epoch (a Keras schedule over optimizer steps)."""
    boundaries = [m * steps_per_epoch for m in milestones]
    if not boundaries:
        return lr
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [lr * 0.1 ** i for i in range(len(boundaries) + 1)])


def train_probe(batches, dim, num_classes, steps_per_epoch, epochs=40, lr=0.01, momentum=0.9,
                milestones=(15, 30), weight_decay=0.0, seed=0, log=None):
    """A LinearHead trained with SGD + step decay. `batches(epoch)` yields (features [B, D], labels [B])
    of one epoch (already standardised)."""
    head = LinearHead(dim, num_classes, seed)
    optimizer = keras.optimizers.SGD(step_schedule(lr, milestones, steps_per_epoch), momentum=momentum)
    variables = [head.w, head.b]

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, head.logits(x)))
            loss = ce + 0.5 * weight_decay * tf.reduce_sum(tf.square(head.w))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return ce

    for epoch in range(epochs):
        losses = [float(step(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32)))
                  for x, y in batches(epoch)]
        if log and (epoch + 1) % 5 == 0:
            log(f"  linear probe epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}")
    return head


def cached_batches(features, labels, batch_size, seed):
    """batches(epoch) over in-memory features, reshuffled each epoch (seeded), last partial batch kept."""
    features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)

    def batches(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(len(features))
        for i in range(0, len(order), batch_size):
            sel = order[i:i + batch_size]
            yield features[sel], labels[sel]
    return batches


def fit_logistic(x, y, num_classes, l2, steps=300, lr=0.05, init=None):
    """Multinomial logistic regression on standardised features: minimises mean cross-entropy +
    l2/2 ||W||^2 with full-batch Adam (convex; `init` warm-starts a regularisation path)."""
    dim = x.shape[1]
    w = tf.Variable(init[0] if init else tf.zeros([dim, num_classes]))
    b = tf.Variable(init[1] if init else tf.zeros([num_classes]))
    x, y = tf.constant(x, tf.float32), tf.constant(y, tf.int32)
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps))

    @tf.function
    def run():
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, tf.matmul(x, w) + b))
                loss = ce + 0.5 * l2 * tf.reduce_sum(tf.square(w))
            optimizer.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))

    run()
    return w.numpy(), b.numpy()


def logistic_regression(train_x, train_y, test_x, test_y, num_classes, l2_values, val_fraction=0.2, seed=0,
                        steps=300):
    """The transfer protocol on features: choose the L2 strength on a stratified held-out part of the
    training set, refit on all of it, report test accuracy. Returns a dict with top1 (top5), the chosen
    l2 and the validation accuracy of every candidate."""
    from cmsf_tf.data import splits

    train_y = np.asarray(train_y, np.int32)
    held_out = splits.percent_split(train_y, 100 * val_fraction, seed)
    stats = standardizer(train_x[~held_out])
    fit_x, val_x = standardize(train_x[~held_out], stats), standardize(train_x[held_out], stats)
    scores, init = {}, None
    for l2 in sorted(l2_values, reverse=True):  # strong to weak: each fit warm-starts the next
        init = fit_logistic(fit_x, train_y[~held_out], num_classes, l2, steps, init=init)
        scores[l2] = top_k_accuracy(val_x @ init[0] + init[1], train_y[held_out], (1,))["top1"]
    best = max(sorted(scores), key=lambda l2: scores[l2])  # ties: the smaller penalty, listed first
    stats = standardizer(train_x)
    w, b = fit_logistic(standardize(train_x, stats), train_y, num_classes, best, steps)
    result = top_k_accuracy(standardize(test_x, stats) @ w + b, test_y)
    result.update(l2=best, val_top1={f"{l2:g}": acc for l2, acc in sorted(scores.items())})
    return result

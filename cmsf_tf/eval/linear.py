"""Linear evaluation on frozen features: the paper's probe and L2-regularised logistic regression.

Probe (self_supervised/eval_linear.py of the paper's code): features L2-normalised, then standardised with
the training set's mean and variance (FullBatchNorm: (x - mean) / sqrt(var + 1e-5)); one linear layer
(PyTorch's default initialisation) trained with SGD (momentum 0.9, weight decay 1e-4 on weight and bias,
lr 0.01, 40 epochs, lr x0.1 at epochs 15 and 30, batch 256) on features of random resized crops, or on
cached centre-crop features (the fast option); the test accuracy after every epoch is kept.
Logistic regression (transfer protocol): the same standardisation, a multinomial softmax layer with an
L2 penalty fitted to convergence with L-BFGS, its strength chosen on a held-out part of the training set.
"""

import keras
import numpy as np
import tensorflow as tf

from cmsf_tf import head_training
from cmsf_tf.head_training import TorchSGD, fit_head, step_schedule

cached_batches = head_training.cached_batches  # the probe's batches; shared with the pseudo-label head

# FullBatchNorm's epsilon in the paper's eval_linear.py: inv_std = 1 / sqrt(var + 1e-5).
STANDARDIZE_EPS = 1e-5


def standardizer(train_features):
    """(mean, std) of L2-normalised training features, per dimension: torch.var_mean's unbiased variance
    and std = sqrt(var + 1e-5), as the paper's FullBatchNorm."""
    x = _unit(train_features).astype(np.float64)
    var = x.var(axis=0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1])
    return x.mean(axis=0).astype(np.float32), np.sqrt(var + STANDARDIZE_EPS).astype(np.float32)


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
    """W [D, C], b [C] as tf.Variables, initialised as torch.nn.Linear (uniform in +-1/sqrt(D))."""

    def __init__(self, dim, num_classes, seed=0):
        bound = 1.0 / np.sqrt(dim)
        self.w = tf.Variable(tf.random.stateless_uniform([dim, num_classes], [seed, 0], -bound, bound), name="w")
        self.b = tf.Variable(tf.random.stateless_uniform([num_classes], [seed, 1], -bound, bound), name="b")

    def logits(self, x):
        return tf.matmul(tf.convert_to_tensor(x, tf.float32), self.w) + self.b

    def predict(self, x, batch_size=4096):
        return np.concatenate([self.logits(x[i:i + batch_size]).numpy() for i in range(0, len(x), batch_size)])


def train_probe(batches, dim, num_classes, steps_per_epoch, epochs=40, lr=0.01, momentum=0.9,
                milestones=(15, 30), weight_decay=1e-4, seed=0, log=None, on_epoch_end=None):
    """A LinearHead trained with SGD + step decay; weight decay as torch.optim.SGD's (grad += wd * p, on
    the bias too). `batches(epoch)` yields (features [B, D], labels [B]) of one epoch (already
    standardised); `on_epoch_end(epoch, head)` is called after each epoch (the per-epoch test accuracy)."""
    head = LinearHead(dim, num_classes, seed)
    optimizer = TorchSGD(step_schedule(lr, milestones, steps_per_epoch), momentum=momentum)

    def step_loss(x, y):
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, head.logits(x)))
        return ce, ce

    def epoch_end(epoch, losses):
        if on_epoch_end is not None:
            on_epoch_end(epoch, head)
        if log and (epoch + 1) % 5 == 0:
            log(f"  linear probe epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}")

    fit_head(step_loss, [(optimizer, [head.w, head.b])],
             lambda epoch: ((tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32))
                            for x, y in batches(epoch)),
             epochs, weight_decay, on_epoch_end=epoch_end)
    return head


def cached_probe_top1(train_x, train_y, test_x, test_y, num_classes, seed=0, epochs=40, batch_size=256, lr=0.01,
                      milestones=(15, 30), weight_decay=1e-4):
    """Test top-1 of the paper's probe (train_probe's defaults: L2-normalised and standardised features,
    SGD 40 epochs, lr 0.01 ÷10 at 15 and 30) trained on cached training features: the last epoch's
    accuracy, so nothing is selected on the test split. Seconds for Fashion-MNIST's 60,000 rows."""
    stats = standardizer(train_x)
    steps = -(-len(train_x) // batch_size)
    head = train_probe(cached_batches(standardize(train_x, stats), train_y, batch_size, seed), np.shape(train_x)[1],
                       num_classes, steps, epochs, lr, 0.9, milestones, weight_decay, seed)
    return top_k_accuracy(head.predict(standardize(test_x, stats)), test_y, (1,))["top1"]


def _softmax_objective(params, x, onehot, l2):
    """Mean cross-entropy + l2/2 ||W||^2 (the bias unpenalised, as scikit-learn) and its gradient, for
    params = [W.ravel(), b] in float64."""
    n, dim = x.shape
    classes = onehot.shape[1]
    w, b = params[:dim * classes].reshape(dim, classes), params[dim * classes:]
    z = x @ w + b
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -np.sum(onehot * log_p) / n + 0.5 * l2 * np.sum(w * w)
    residual = (np.exp(log_p) - onehot) / n
    grad_w = x.T @ residual + l2 * w
    return loss, np.concatenate([grad_w.ravel(), residual.sum(axis=0)])


def lbfgs(fun, x0, max_iter=1000, tol=1e-6, memory=10):
    """Minimises a smooth function with L-BFGS (two-loop recursion, backtracking Armijo line search).
    `fun(x) -> (value, gradient)`. Stops when the largest gradient entry is below `tol` (scikit-learn's
    lbfgs criterion) or after `max_iter` iterations. Returns (x, value, iterations)."""
    x = np.array(x0, np.float64)
    value, grad = fun(x)
    s_list, y_list = [], []
    for iteration in range(1, max_iter + 1):
        if np.abs(grad).max() < tol:
            return x, value, iteration - 1
        q = grad.copy()
        alphas = []
        for s_k, y_k in reversed(list(zip(s_list, y_list))):
            a = s_k @ q / (y_k @ s_k)
            alphas.append(a)
            q -= a * y_k
        if s_list:
            q *= (s_list[-1] @ y_list[-1]) / (y_list[-1] @ y_list[-1])
        for (s_k, y_k), a in zip(zip(s_list, y_list), reversed(alphas)):
            q += s_k * (a - (y_k @ q) / (y_k @ s_k))
        direction = -q
        slope = grad @ direction
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_list, y_list, direction, slope = [], [], -grad, -(grad @ grad)
        step = 1.0 if s_list else min(1.0, 1.0 / max(np.abs(grad).sum(), 1e-12))
        while True:
            new_x = x + step * direction
            new_value, new_grad = fun(new_x)
            if new_value <= value + 1e-4 * step * slope or step < 1e-20:
                break
            step *= 0.5
        s_k, y_k = new_x - x, new_grad - grad
        if s_k @ y_k > 1e-12:  # keep the curvature pairs that keep the inverse Hessian positive
            s_list.append(s_k)
            y_list.append(y_k)
            if len(s_list) > memory:
                s_list.pop(0)
                y_list.pop(0)
        converged = abs(value - new_value) <= 1e-12 * max(abs(value), abs(new_value), 1.0)
        x, value, grad = new_x, new_value, new_grad
        if converged:
            return x, value, iteration
    return x, value, max_iter


def fit_logistic(x, y, num_classes, l2, max_iter=1000, init=None):
    """Multinomial logistic regression on standardised features, fitted to convergence with L-BFGS:
    minimises mean cross-entropy + l2/2 ||W||^2 (the bias unpenalised). `init` = (W, b) warm-starts a
    regularisation path. Returns (W [D, C], b [C]) as float32."""
    x = np.asarray(x, np.float64)
    dim = x.shape[1]
    onehot = np.eye(num_classes)[np.asarray(y)]
    start = (np.concatenate([np.ravel(init[0]), init[1]]) if init is not None
             else np.zeros(dim * num_classes + num_classes))
    params, _, _ = lbfgs(lambda p: _softmax_objective(p, x, onehot, l2), start, max_iter=max_iter)
    return (params[:dim * num_classes].reshape(dim, num_classes).astype(np.float32),
            params[dim * num_classes:].astype(np.float32))


def logistic_regression(train_x, train_y, test_x, test_y, num_classes, l2_values, val_fraction=0.2, seed=0,
                        max_iter=1000):
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
        init = fit_logistic(fit_x, train_y[~held_out], num_classes, l2, max_iter, init=init)
        scores[l2] = top_k_accuracy(val_x @ init[0] + init[1], train_y[held_out], (1,))["top1"]
    best = max(sorted(scores), key=lambda l2: scores[l2])  # ties: the smaller penalty, listed first
    stats = standardizer(train_x)
    w, b = fit_logistic(standardize(train_x, stats), train_y, num_classes, best, max_iter)
    result = top_k_accuracy(standardize(test_x, stats) @ w + b, test_y)
    result.update(l2=best, val_top1={f"{l2:g}": acc for l2, acc in sorted(scores.items())})
    return result

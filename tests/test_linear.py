"""Linear evaluation: standardisation, the SGD probe and the transfer logistic regression."""

import numpy as np
import pytest

from cmsf_tf.eval import linear


def blobs(n, dim, classes, noise, seed):
    centres = np.random.default_rng(99).normal(size=(classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centres[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int32)


def test_standardisation_is_the_papers_full_batch_norm():
    """L2 normalisation, then (x - mean) / sqrt(var + 1e-5) with torch.var_mean's unbiased variance
    (FullBatchNorm of the paper's eval_linear.py)."""
    x, _ = blobs(500, 8, 3, 1.0, 0)
    stats = linear.standardizer(x)
    z = linear.standardize(x, stats)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(z, (unit - unit.mean(0)) / np.sqrt(unit.var(0, ddof=1) + 1e-5), rtol=1e-4, atol=1e-4)
    # Scaling a feature vector does not change it (the L2 normalisation comes first).
    np.testing.assert_allclose(linear.standardize(3 * x, stats), z, atol=1e-4)


def test_probe_step_is_torch_sgd_with_coupled_weight_decay_and_torch_init():
    """One SGD step (momentum buffer = gradient on the first step) against NumPy: w -= lr * (dCE/dw + wd * w)
    for the weight and the bias; initial values uniform in +-1/sqrt(D) like torch.nn.Linear."""
    x, y = blobs(32, 6, 3, 0.5, 7)
    start = linear.LinearHead(6, 3, seed=5)
    w0, b0 = start.w.numpy().astype(np.float64), start.b.numpy().astype(np.float64)
    assert np.abs(w0).max() <= 1 / np.sqrt(6) and np.abs(b0).max() <= 1 / np.sqrt(6) and np.abs(b0).max() > 0
    head = linear.train_probe(lambda epoch: iter([(x, y)]), 6, 3, steps_per_epoch=1, epochs=1, lr=0.1,
                              weight_decay=0.05, seed=5)
    z = x @ w0 + b0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(3)[y]) / len(x)
    np.testing.assert_allclose(head.w.numpy(), w0 - 0.1 * (x.T @ residual + 0.05 * w0), atol=1e-5)
    np.testing.assert_allclose(head.b.numpy(), b0 - 0.1 * (residual.sum(0) + 0.05 * b0), atol=1e-5)


def test_probe_reaches_100_percent_on_separable_features():
    x, y = blobs(2000, 32, 10, 0.3, 1)
    xt, yt = blobs(500, 32, 10, 0.3, 2)
    stats = linear.standardizer(x)
    head = linear.train_probe(linear.cached_batches(linear.standardize(x, stats), y, 256, 0), 32, 10,
                              steps_per_epoch=8, epochs=10, milestones=(5, 8))
    acc = linear.top_k_accuracy(head.predict(linear.standardize(xt, stats)), yt)
    assert acc["top1"] == 1.0 and acc["top5"] == 1.0


def test_cached_probe_top1_is_the_last_epochs_test_accuracy_of_the_papers_probe():
    x, y = blobs(600, 16, 5, 0.8, 4)  # overlapping classes: neither 0% nor 100%
    xt, yt = blobs(300, 16, 5, 0.8, 5)
    got = linear.cached_probe_top1(x, y, xt, yt, 5, seed=3, epochs=4, batch_size=64, milestones=(2,))
    # The same probe written out: standardised by the training features, SGD over seeded batches.
    stats = linear.standardizer(x)
    head = linear.train_probe(linear.cached_batches(linear.standardize(x, stats), y, 64, 3), 16, 5, steps_per_epoch=10,
                              epochs=4, milestones=(2,), seed=3)
    expected = linear.top_k_accuracy(head.predict(linear.standardize(xt, stats)), yt, (1,))["top1"]
    assert got == expected and 0.3 < got < 1.0
    assert linear.cached_probe_top1(x, y, xt, np.roll(yt, 1), 5, seed=3, epochs=4, batch_size=64) < got - 0.1


def test_probe_learning_rate_drops_at_the_milestones_and_reports_every_epoch():
    x, y = blobs(64, 4, 2, 0.3, 3)
    seen, ends = [], []

    def batches(epoch):
        seen.append(epoch)
        yield x, y
    linear.train_probe(batches, 4, 2, steps_per_epoch=1, epochs=3, lr=0.5, milestones=(1, 2),
                       on_epoch_end=lambda epoch, head: ends.append((epoch, head.w.numpy().copy())))
    assert seen == [0, 1, 2] and [e for e, _ in ends] == [0, 1, 2]
    assert not np.allclose(ends[0][1], ends[1][1])


def test_top_k_accuracy_breaks_ties_towards_the_smaller_class():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert linear.top_k_accuracy(logits, [0, 2], ks=(1,))["top1"] == 0.5


def test_lbfgs_logistic_regression_reaches_scikit_learns_optimum():
    """Fit by fit, for every L2 strength of the transfer protocol: the same test accuracy within 0.1
    point and the same objective (scikit-learn's C = 1 / (l2 * N) for mean loss + l2/2 ||W||^2)."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(1500, 48, 6, 2.5, 4)  # overlapping: regularisation matters
    xt, yt = blobs(1000, 48, 6, 2.5, 5)
    stats = linear.standardizer(x)
    zx, zt = linear.standardize(x, stats), linear.standardize(xt, stats)
    onehot = np.eye(6)[y]
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        w, b = linear.fit_logistic(zx, y, 6, l2)
        ref = sklearn.LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=20000).fit(zx, y)
        ours = linear.top_k_accuracy(zt @ w + b, yt, (1,))["top1"]
        assert ours == pytest.approx(ref.score(zt, yt), abs=0.001), l2
        mine = linear._softmax_objective(np.concatenate([w.ravel(), b]).astype(np.float64), zx, onehot, l2)[0]
        theirs = linear._softmax_objective(np.concatenate([ref.coef_.T.ravel(), ref.intercept_]), zx, onehot, l2)[0]
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7), l2


def test_logistic_regression_picks_l2_on_held_out_data():
    x, y = blobs(1500, 48, 6, 2.5, 4)
    xt, yt = blobs(1000, 48, 6, 2.5, 5)
    result = linear.logistic_regression(x, y, xt, yt, 6, l2_values=[0, 1e-3, 1e-2, 1e-1, 1.0])
    assert set(result["val_top1"]) == {"0", "0.001", "0.01", "0.1", "1"}
    assert result["val_top1"][f"{result['l2']:g}"] == max(result["val_top1"].values())
    stats = linear.standardizer(x)
    w, b = linear.fit_logistic(linear.standardize(x, stats), y, 6, result["l2"])
    assert result["top1"] == linear.top_k_accuracy(linear.standardize(xt, stats) @ w + b, yt, (1,))["top1"]
    assert 0.5 < result["top1"] < 1.0


def test_lbfgs_minimises_a_quadratic_exactly():
    a = np.diag([1.0, 10.0, 100.0])
    target = np.array([1.0, -2.0, 3.0])
    x, value, iterations = linear.lbfgs(lambda v: (0.5 * (v - target) @ a @ (v - target), a @ (v - target)),
                                        np.zeros(3), tol=1e-10)
    np.testing.assert_allclose(x, target, atol=1e-8)
    assert iterations < 50


def test_step_schedule_drops_on_the_first_step_of_a_milestone_epoch():
    schedule = linear.step_schedule(1.0, (2, 3), steps_per_epoch=4)
    lrs = [float(schedule(step)) for step in range(16)]  # the optimizer's 0-based step count
    np.testing.assert_allclose(lrs, [1.0] * 8 + [0.1] * 4 + [0.01] * 4, rtol=1e-6)


def test_torch_sgd_follows_pytorch_across_a_learning_rate_milestone():
    """TorchSGD (the heads' optimizer) against torch.optim.SGD with the rate divided by 10 after 4 steps,
    fed the same gradients: the same weights; Keras' SGD (velocity = m v - lr g) is not."""
    torch = pytest.importorskip("torch")
    import keras

    from cmsf_tf.head_training import TorchSGD, step_schedule

    rng = np.random.RandomState(0)
    start = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(10)]
    reference = torch.nn.Parameter(torch.from_numpy(start.copy()))
    sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[2])
    for epoch in range(5):  # 2 steps per epoch, milestone at epoch 2
        for g in grads[2 * epoch:2 * epoch + 2]:
            reference.grad = torch.from_numpy(g)
            sgd.step()
        scheduler.step()
    want = reference.detach().numpy()

    def run(optimizer):
        w = keras.Variable(start.copy())
        for g in grads:
            optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), w)])
        return np.asarray(w)

    np.testing.assert_allclose(run(TorchSGD(step_schedule(0.1, [2], 2), momentum=0.9)), want, rtol=1e-5, atol=1e-6)
    assert np.abs(run(keras.optimizers.SGD(step_schedule(0.1, [2], 2), momentum=0.9)) - want).max() > 1e-2

"""Linear evaluation: standardisation, the SGD probe and the transfer logistic regression."""

import numpy as np
import pytest

from cmsf_tf.eval import linear


def blobs(n, dim, classes, noise, seed):
    centres = np.random.default_rng(99).normal(size=(classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centres[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int32)


def test_standardisation_is_l2_normalisation_then_training_mean_and_std():
    x, _ = blobs(500, 8, 3, 1.0, 0)
    stats = linear.standardizer(x)
    z = linear.standardize(x, stats)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(z, (unit - unit.mean(0)) / (unit.std(0) + 1e-6), rtol=1e-4, atol=1e-4)
    # Scaling a feature vector does not change it (the L2 normalisation comes first).
    np.testing.assert_allclose(linear.standardize(3 * x, stats), z, atol=1e-4)


def test_probe_reaches_100_percent_on_separable_features():
    x, y = blobs(2000, 32, 10, 0.3, 1)
    xt, yt = blobs(500, 32, 10, 0.3, 2)
    stats = linear.standardizer(x)
    head = linear.train_probe(linear.cached_batches(linear.standardize(x, stats), y, 256, 0), 32, 10,
                              steps_per_epoch=8, epochs=10, milestones=(5, 8))
    acc = linear.top_k_accuracy(head.predict(linear.standardize(xt, stats)), yt)
    assert acc["top1"] == 1.0 and acc["top5"] == 1.0


def test_probe_learning_rate_drops_at_the_milestones():
    x, y = blobs(64, 4, 2, 0.3, 3)
    seen = []

    def batches(epoch):
        seen.append(epoch)
        yield x, y
    linear.train_probe(batches, 4, 2, steps_per_epoch=1, epochs=3, lr=0.5, milestones=(1, 2))
    assert seen == [0, 1, 2]


def test_top_k_accuracy_breaks_ties_towards_the_smaller_class():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert linear.top_k_accuracy(logits, [0, 2], ks=(1,))["top1"] == 0.5


def test_logistic_regression_matches_scikit_learn_and_picks_l2_on_held_out_data():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(1500, 48, 6, 2.5, 4)  # overlapping: regularisation matters
    xt, yt = blobs(1000, 48, 6, 2.5, 5)
    result = linear.logistic_regression(x, y, xt, yt, 6, l2_values=[0, 1e-3, 1e-2, 1e-1, 1.0])
    assert set(result["val_top1"]) == {"0", "0.001", "0.01", "0.1", "1"}
    assert result["val_top1"][f"{result['l2']:g}"] == max(result["val_top1"].values())
    stats = linear.standardizer(x)
    # scikit-learn's C is 1 / (l2 * N) for a mean loss + l2/2 ||W||^2.
    ref = sklearn.LogisticRegression(C=1.0 / (max(result["l2"], 1e-6) * len(x)), max_iter=5000).fit(
        linear.standardize(x, stats), y)
    assert result["top1"] == pytest.approx(ref.score(linear.standardize(xt, stats), yt), abs=0.015)
    assert 0.5 < result["top1"] < 1.0

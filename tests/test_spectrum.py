"""RankMe (eval.spectrum) against NumPy references: the directions a representation uses."""

import numpy as np
import pytest

from cmsf_tf.eval import spectrum


def reference_rankme(x, eps=1e-7):
    # The singular values from the Gram matrix's eigenvalues: another route to the same spectrum.
    eig = np.clip(np.linalg.eigvalsh(x.T @ x), 0, None)
    sigma = np.sort(np.sqrt(eig))[::-1][:min(x.shape)]
    p = sigma / sigma.sum() + eps
    return np.exp(-np.sum(p * np.log(p)))


def test_equal_use_of_r_directions_gives_r():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    for r in (1, 3, 10, 32):
        # 64 rows per direction, each direction carrying the same energy: r equal singular values
        x = np.repeat(basis[:r], 64, axis=0) * rng.choice([-1.0, 1.0], size=(64 * r, 1))
        assert spectrum.rankme(x) == pytest.approx(r, rel=1e-4)


def test_matches_the_gram_matrix_reference_on_uneven_spectra():
    rng = np.random.default_rng(1)
    for scales in ([1.0] * 16, [4.0, 2.0, 1.0, 0.5, 0.1], np.geomspace(1, 1e-3, 24)):
        x = rng.normal(size=(500, len(scales))) * np.asarray(scales)
        x = x @ np.linalg.qr(rng.normal(size=(len(scales), len(scales))))[0]
        assert spectrum.rankme(x) == pytest.approx(reference_rankme(x), rel=1e-6)
    collapsed = np.outer(rng.normal(size=300), rng.normal(size=20))  # one direction only
    assert spectrum.rankme(collapsed) == pytest.approx(1.0, abs=1e-3)


def test_large_inputs_use_an_evenly_spaced_subset_and_bad_ones_give_nan():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 8)) * np.arange(1, 9)
    subset = x[np.linspace(0, 999, 100).astype(int)]
    assert spectrum.rankme(x, max_rows=100) == pytest.approx(reference_rankme(subset), rel=1e-6)
    assert spectrum.rankme(x, max_rows=100) != pytest.approx(spectrum.rankme(x), rel=1e-6)
    assert np.isnan(spectrum.rankme(np.zeros((0, 8))))
    assert np.isnan(spectrum.rankme(np.zeros((5, 8))))


def test_the_printed_table_has_a_rankme_column():
    from cmsf_tf.train import summary_lines

    result = {"method": "msf", "epochs": 10, "knn_top1_k20": 0.854, "knn_top1_k1": 0.835, "rankme": 21.44,
              "baselines": {"raw_pixels": {"knn_top1_k20": 0.841, "knn_top1_k1": 0.858, "rankme": 160.02},
                            "untrained": {"knn_top1_k20": 0.788, "knn_top1_k1": 0.77}}}
    assert summary_lines(result) == [
        "Top-1 on the test split            20-NN    1-NN  RankMe",
        "  trained (msf, 10 epochs)         85.4%   83.5%    21.4",
        "  raw pixels                       84.1%   85.8%   160.0",
        "  untrained                        78.8%   77.0%        ",
        "  20-NN / 1-NN: the nearest training images vote; RankMe: feature directions in use."]

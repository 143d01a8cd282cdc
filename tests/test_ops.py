"""ops.py against NumPy references on random data."""

import numpy as np
import pytest
import tensorflow as tf

from cmsf_tf import ops

RNG = np.random.default_rng(0)


def unit(n, d):
    x = RNG.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_nearest(targets, bank, k, allowed=None):
    sims = targets @ bank.T
    out = []
    for b in range(len(targets)):
        ok = np.ones(len(bank), bool) if allowed is None else allowed[b]
        # Allowed rows by similarity, then (only if fewer than k) disallowed rows by similarity.
        order = sorted(range(len(bank)), key=lambda j: (not ok[j], -sims[b, j]))
        out.append(order[:k])
    return np.array(out)


@pytest.mark.parametrize("k", [1, 5])
def test_nearest_neighbours_matches_reference(k):
    t, m = unit(8, 16), unit(50, 16)
    got = ops.nearest_neighbours(t, m, k).numpy()
    np.testing.assert_array_equal(got, ref_nearest(t, m, k))
    assert got.dtype == np.int32 and got.shape == (8, k)


def test_official_fill_puts_every_disallowed_row_at_distance_five():
    """UCDvision/CMSF supervised/train_cmsf_sup.py:190: Dk[disallowed] = 5.0, then topk(largest=False). With fewer than k
    allowed rows the fill rows tie; top-k takes the lowest indices (torch's order for ties is unspecified)."""
    t, m = unit(8, 16), unit(60, 16)
    allowed = RNG.random((8, 60)) < 0.05  # most queries have fewer than 5 allowed rows
    allowed[0] = False  # and one has none
    got = ops.nearest_neighbours(t, m, 5, tf.constant(allowed), fill="official").numpy()
    distances = np.where(allowed, 2 - 2 * (t @ m.T), 5.0)
    want = np.argsort(distances, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[0], np.arange(5))
    assert (allowed.sum(1) < 5).sum() >= 4
    # The default fill differs exactly there: nearest disallowed rows instead of the first indices.
    nearest = ops.nearest_neighbours(t, m, 5, tf.constant(allowed)).numpy()
    np.testing.assert_array_equal(nearest, ref_nearest(t, m, 5, allowed))
    assert not np.array_equal(nearest, got)


def test_nearest_neighbours_respects_allowed_mask():
    t, m = unit(8, 16), unit(60, 16)
    allowed = RNG.random((8, 60)) < 0.3
    got = ops.nearest_neighbours(t, m, 5, tf.constant(allowed)).numpy()
    np.testing.assert_array_equal(got, ref_nearest(t, m, 5, allowed))
    for b in range(8):
        assert allowed[b, got[b]].all()


def test_nearest_neighbours_fills_from_nearest_disallowed_rows():
    t, m = unit(4, 8), unit(30, 8)
    allowed = np.zeros((4, 30), bool)
    allowed[:, :2] = True  # only two allowed rows per query, k = 5
    got = ops.nearest_neighbours(t, m, 5, tf.constant(allowed)).numpy()
    np.testing.assert_array_equal(got, ref_nearest(t, m, 5, allowed))
    assert set(got[:, :2].ravel()) <= {0, 1}


def test_label_constraint_reference_and_negative_labels():
    q = np.array([0, 1, -1, 2, 1], np.int32)
    bank = np.array([0, 1, 1, -1, 2, 0, -1], np.int32)
    got = ops.label_constraint(q, bank).numpy()
    want = (q[:, None] == bank[None, :]) | (q[:, None] < 0)
    np.testing.assert_array_equal(got, want)
    assert got[2].all()  # negative query label: unconstrained
    assert not got[[0, 1, 3, 4]][:, [3, 6]].any()  # negative bank label never matches a real label


def test_label_constraint_with_int64_bank_labels():
    got = ops.label_constraint(tf.constant([3], tf.int32), tf.constant([3, 4], tf.int64)).numpy()
    np.testing.assert_array_equal(got, [[True, False]])


def test_nearest_among_from_sims_matches_masked_reference():
    t, m = unit(6, 16), unit(80, 16)
    cands = np.stack([RNG.choice(80, 10, replace=False) for _ in range(6)])
    got = ops.nearest_among_from_sims(ops.similarities(t, m), cands, 4).numpy()
    allowed = np.zeros((6, 80), bool)
    np.put_along_axis(allowed, cands, True, axis=1)
    np.testing.assert_array_equal(got, ref_nearest(t, m, 4, allowed))


def test_two_queue_neighbours_match_the_mask_form():
    """CMSF-2Q's constraint: candidates = top-k' of t' in M'; the k candidates nearest t in M. Equals the
    top-k of t in M under the B x K mask of the candidates (the NumPy reference)."""
    t, t_prev, m, m_prev = unit(8, 16), unit(8, 16), unit(120, 16), unit(120, 16)
    got = ops.two_queue_neighbours(ops.similarities(t, m), t_prev, m_prev, 5, 10).numpy()
    allowed = np.zeros((8, 120), bool)
    np.put_along_axis(allowed, ref_nearest(t_prev, m_prev, 10, np.ones((8, 120), bool)), True, axis=1)
    np.testing.assert_array_equal(got, ref_nearest(t, m, 5, allowed))
    # k' = k: the constrained set is exactly the previous view's neighbours, re-ordered by t.
    got = ops.two_queue_neighbours(ops.similarities(t, m), t_prev, m_prev, 5, 5).numpy()
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(ref_nearest(t_prev, m_prev, 5), axis=1))


def test_label_neighbours_match_the_mask_form():
    """KM / supervised / Pseudo: top-k among same-label rows (query label -1: unconstrained), short sets
    filled with the nearest other rows."""
    t, m = unit(7, 16), unit(60, 16)
    query = np.array([0, 1, 2, -1, 0, 3, 1])
    bank = RNG.integers(-1, 3, size=60)  # class 3 has no row: that query is filled with its nearest rows
    got = ops.label_neighbours(ops.similarities(t, m), query, bank, 4).numpy()
    allowed = (query[:, None] == bank[None, :]) | (query[:, None] < 0)
    np.testing.assert_array_equal(got, ref_nearest(t, m, 4, allowed))


def test_mean_shift_loss_matches_reference():
    q, m = unit(7, 16), unit(40, 16)
    idx = RNG.integers(0, 40, size=(7, 5)).astype(np.int32)
    want = np.mean(2 - 2 * np.einsum("bd,bkd->bk", q, m[idx]))
    np.testing.assert_allclose(ops.mean_shift_loss(q, m, idx).numpy(), want, rtol=1e-5)


def test_mean_shift_loss_is_zero_for_identical_rows():
    m = unit(10, 8)
    idx = np.arange(10, dtype=np.int32)[:, None]
    np.testing.assert_allclose(ops.mean_shift_loss(m, m, idx).numpy(), 0.0, atol=1e-6)


def test_purity_matches_reference():
    ql = RNG.integers(0, 3, 9).astype(np.int32)
    bl = RNG.integers(-1, 3, 30).astype(np.int32)
    idx = RNG.integers(0, 30, size=(9, 4)).astype(np.int32)
    want = np.mean(bl[idx] == ql[:, None])
    np.testing.assert_allclose(ops.purity(ql, bl, idx).numpy(), want)


def test_purity_never_counts_unlabelled_rows_as_matches():
    # Semi-supervised and label-split runs: -1 (unlabelled query or row) == -1 is not a match.
    ql = RNG.integers(-1, 3, 40).astype(np.int32)
    bl = RNG.integers(-1, 3, 30).astype(np.int32)
    idx = RNG.integers(0, 30, size=(40, 5)).astype(np.int32)
    want = np.mean((bl[idx] == ql[:, None]) & (ql[:, None] >= 0))
    assert np.any((bl[idx] == -1) & (ql[:, None] == -1))  # the case the rule is about occurs
    np.testing.assert_allclose(ops.purity(ql, bl, idx).numpy(), want)
    all_unlabelled = np.full(6, -1, np.int32)
    assert ops.purity(all_unlabelled, np.full(30, -1, np.int32), idx[:6]).numpy() == 0.0


def test_ops_compile_with_xla():
    t, m = unit(4, 8), unit(32, 8)
    allowed = tf.constant(RNG.random((4, 32)) < 0.5)
    fn = tf.function(lambda t, m, a: ops.nearest_neighbours(t, m, 3, a), jit_compile=True)
    np.testing.assert_array_equal(fn(t, m, allowed).numpy(), ops.nearest_neighbours(t, m, 3, allowed).numpy())


def test_pseudo_query_labels_follow_the_rule_against_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(200, 5)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 5, 200)
    labels[rng.random(200) < 0.7] = -1  # unlabelled examples carry -1
    is_labelled = labels >= 0
    want = np.where(is_labelled, labels, np.where(probs.max(1) >= 0.85, probs.argmax(1), -1))
    got = ops.pseudo_query_labels(tf.constant(labels, tf.int32), tf.constant(is_labelled),
                                  tf.constant(probs, tf.float32), 0.85).numpy()
    np.testing.assert_array_equal(got, want)
    # All three cases occur, so the test tells them apart.
    assert is_labelled.any() and (want[~is_labelled] >= 0).any() and (want == -1).any()
    # A labelled example keeps its label even when the head is confidently wrong.
    assert np.any(is_labelled & (probs.argmax(1) != labels) & (probs.max(1) >= 0.85))


def test_ranks_in_order_match_numpy_argsort():
    rng = np.random.default_rng(3)
    sims = rng.normal(size=(6, 50)).astype(np.float32)  # continuous: no ties
    chosen = np.stack([rng.choice(50, size=4, replace=False) for _ in range(6)])
    order = np.argsort(-sims, axis=1)
    expected = np.array([[np.flatnonzero(order[b] == j)[0] for j in chosen[b]] for b in range(6)])
    np.testing.assert_array_equal(ops.ranks_in_order(tf.constant(sims), tf.constant(chosen)).numpy(), expected)
    # The plain top-k ranks 0..k-1.
    top = ops.top_k_indices(tf.constant(sims), 4)
    np.testing.assert_array_equal(ops.ranks_in_order(tf.constant(sims), top).numpy(), np.tile(np.arange(4), (6, 1)))


def test_rank_histogram_metric_counts_and_mean():
    from cmsf_tf.methods.base import RankHistogram

    metric = RankHistogram(bins=8)
    metric.update_state(tf.constant([[0.0, 1.0], [3.0, 20.0]]))
    metric.update_state(tf.constant([[1.0, 7.0]]))
    np.testing.assert_array_equal(metric.counts(), [1, 2, 0, 1, 0, 0, 0, 2])  # 7 and 20 share the last bin
    assert float(metric.result()) == pytest.approx((0 + 1 + 3 + 20 + 1 + 7) / 6)
    metric.reset_state()
    assert metric.counts().sum() == 0 and float(metric.result()) == 0.0


@pytest.mark.parametrize("chunk", [1, 3, 7, 20, 64])
def test_chunked_top_k_is_the_exact_search_in_any_chunking(chunk):
    """Against a stable NumPy sort of the full similarity matrix: the same ids (ties to the smaller id,
    including rows duplicated across chunk borders) and similarities, for chunks that do not divide N."""
    rng = np.random.default_rng(chunk)
    index = rng.normal(size=(20, 6)).astype(np.float32)
    index[11] = index[2]  # exact ties, in different chunks for most chunk sizes
    index[19] = index[2]
    queries = np.concatenate([rng.normal(size=(4, 6)), index[2:3]]).astype(np.float32)
    sims = queries @ index.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    got_sims, got_ids = tf.function(lambda q: ops.chunked_top_k(q, tf.constant(index), 5, chunk=chunk))(queries)
    np.testing.assert_array_equal(got_ids.numpy(), want)
    np.testing.assert_allclose(got_sims.numpy(), np.take_along_axis(sims, want, 1), rtol=1e-6, atol=1e-6)
    assert got_ids.dtype == tf.int64 and got_sims.dtype == tf.float32


def test_chunked_top_k_bfloat16_index_and_empty_batch():
    rng = np.random.default_rng(0)
    index = rng.normal(size=(30, 8)).astype(np.float32)
    rounded = tf.cast(tf.constant(index), tf.bfloat16)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    sims = queries @ tf.cast(rounded, tf.float32).numpy().T  # the bfloat16 rows, compared in float32
    got_sims, got_ids = ops.chunked_top_k(queries, rounded, 4, chunk=8)
    np.testing.assert_array_equal(got_ids.numpy(), np.argsort(-sims, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(got_sims.numpy(), np.sort(sims, axis=1)[:, ::-1][:, :4], rtol=1e-6, atol=1e-6)
    empty_sims, empty_ids = ops.chunked_top_k(np.zeros((0, 8), np.float32), rounded, 4, chunk=8)
    assert empty_sims.shape == (0, 4) and empty_ids.shape == (0, 4)


def test_the_multi_crop_loss_is_the_mean_of_the_per_view_losses():
    """--multi_crop's loss: every query view (the strong view, each small crop) pulled towards its image's
    weighted neighbour sets, each view's loss averaged over the batch, then the views averaged (NumPy)."""
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    b, n, d = 4, 3, 8
    bank = unit(rng.normal(size=(16, d))).astype(np.float32)
    strong = unit(rng.normal(size=(b, d))).astype(np.float32)
    small = unit(rng.normal(size=(b, n, d))).astype(np.float32)  # image-major: image i's n crops together
    sets = [(0.7, rng.integers(0, 16, (b, 3)).astype(np.int32)), (0.3, rng.integers(0, 16, (b, 5)).astype(np.int32))]

    def view_loss(q):  # one view: [B, D]
        return sum(w * np.mean(2 - 2 * np.einsum("bd,bkd->bk", q, bank[idx])) for w, idx in sets)

    want = np.mean([view_loss(strong)] + [view_loss(small[:, v]) for v in range(n)])
    groups = ops.view_group_losses([(1, tf.constant(strong)), (n, tf.constant(small.reshape(b * n, d)))],
                                   tf.constant(bank), [(w, tf.constant(i)) for w, i in sets])
    # per group (what --multi_crop logs as loss_strong and loss_small): the strong view's, the small crops' mean
    np.testing.assert_allclose([float(g) for g in groups],
                               [view_loss(strong), np.mean([view_loss(small[:, v]) for v in range(n)])], rtol=1e-5)
    np.testing.assert_allclose(float(ops.mean_over_views([1, n], groups)), want, rtol=1e-5)
    # One view alone is the plain weighted loss, untouched (a run without small crops is unchanged).
    alone = ops.mean_over_views([1], ops.view_group_losses([(1, tf.constant(strong))], tf.constant(bank),
                                                           [(w, tf.constant(i)) for w, i in sets]))
    np.testing.assert_allclose(float(alone), view_loss(strong), rtol=1e-6)

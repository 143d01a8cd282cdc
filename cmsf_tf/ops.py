"""Pure tensor functions of the mean-shift family: neighbour search, constraints, loss, purity.

Inputs are L2-normalised float tensors and similarity is the dot product. Nothing here knows about
Keras, flags or state, so every function can be checked against NumPy in milliseconds. All shapes are
static apart from the batch, and there is no Python control flow on tensor values (XLA/TPU friendly).
"""

import tensorflow as tf

# A disallowed row is pushed this far down in similarity. Allowed rows have similarity >= -1 and
# disallowed ones <= 1 - penalty < -1, so every allowed row ranks first; when a query has fewer than k
# allowed rows the rest are filled with its nearest disallowed rows, in order. (The paper's code sets the
# distance of every disallowed row to one constant instead, so its fill rows are arbitrary: see
# OFFICIAL_FILL_SIMILARITY.)
DISALLOWED_PENALTY = 4.0
# --constraint_fill=official: the paper's code sets the distance 2 - 2<t, m> of every disallowed row to
# 5.0 (UCDvision/CMSF supervised/train_cmsf_sup.py:190, "set non category distances to 5"), i.e. the similarity to -1.5, so
# the fill rows of a query with fewer than k allowed rows are ties: top-k takes the lowest bank indices.
OFFICIAL_FILL_SIMILARITY = -1.5
FILLS = ("nearest", "official")


def coupled_l2(variables, weight_decay):
    """torch.optim.SGD's weight_decay as a loss term: 0.5 * wd * the sum of ||v||^2 over every variable
    (biases and BatchNorm included), in float32, whose gradient wd * v is what PyTorch adds to each
    gradient (Keras' own weight_decay is decoupled). The train step and fit_head's heads add it."""
    return 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in variables])


def similarities(targets, bank):
    """float32 [B, K] dot products of each target with each bank row, computed in the bank's dtype (a
    bfloat16 bank: a bfloat16 matmul, 2-3x faster on CPUs with AVX512-BF16, with similarities rounded
    to 8 bits of mantissa)."""
    # BatchMatMul with adj_y, not MatMul(transpose_b=True): with oneDNN the latter took 100-196 ms for
    # B 256 x K 128,000 x D 512 and this 75 ms on 2 cores (tools/bench_nn.py). Mixed float32 x bfloat16
    # operands would fall back to the slow SparseMatMul kernel, hence the cast.
    sims = tf.linalg.matmul(tf.cast(targets, bank.dtype)[None], bank[None], adjoint_b=True)[0]
    return tf.cast(sims, tf.float32)


def top_k_indices(sims, k, allowed=None, fill="nearest"):
    """Indices of the k largest entries per row of `sims`, restricted to `allowed` where given. Rows
    with fewer than k allowed entries are filled with their most similar disallowed ones (`fill=
    "nearest"`) or, as the paper's code, with arbitrary ones (`"official"`: the lowest indices)."""
    if allowed is not None:
        if fill == "official":
            sims = tf.where(allowed, sims, tf.constant(OFFICIAL_FILL_SIMILARITY, sims.dtype))
        else:
            sims = tf.where(allowed, sims, sims - DISALLOWED_PENALTY)
    return tf.math.top_k(sims, k=k, sorted=True).indices


def nearest_neighbours(targets, bank, k, allowed=None, fill="nearest"):
    """int32[B, k]: the k bank rows most similar to each target, sorted, among `allowed` rows.

    `allowed` is bool[B, K] or None (all rows). A query with fewer than k allowed rows gets its nearest
    disallowed rows after all of its allowed ones (see DISALLOWED_PENALTY), or arbitrary ones with
    `fill="official"`.
    """
    return top_k_indices(similarities(targets, bank), k, allowed, fill)


def label_constraint(query_labels, bank_labels):
    """bool[B, K]: true where the labels are equal.

    A query label < 0 means "unconstrained": its whole row is true. A bank label < 0 (an empty slot or
    a row without a confident label) never equals a query label >= 0.
    """
    query_labels = tf.convert_to_tensor(query_labels)
    bank_labels = tf.cast(tf.convert_to_tensor(bank_labels), query_labels.dtype)
    same = tf.equal(query_labels[:, None], bank_labels[None, :])
    return tf.logical_or(same, (query_labels < 0)[:, None])


def nearest_among_from_sims(sims, candidates, k):
    """int32[B, k]: the k of the candidate bank rows `candidates` (int[B, C]) with the largest `sims`,
    sorted: only the B x C candidate entries of the [B, K] similarities are gathered."""
    candidates = tf.cast(candidates, tf.int32)
    order = tf.math.top_k(tf.gather(sims, candidates, batch_dims=1), k=k, sorted=True).indices
    return tf.gather(candidates, order, batch_dims=1)


def ranks_in_order(sims, indices):
    """float32 [B, k]: the 0-based rank of each chosen bank row `indices[b, j]` in row b's unconstrained
    order (the number of rows strictly more similar). Neighbours a constraint brings in from beyond the
    plain top-k ("distant yet related", the paper's analysis) rank >= k. Costs B x k x K comparisons."""
    chosen = tf.gather(sims, tf.cast(indices, tf.int32), batch_dims=1)  # [B, k]
    return tf.reduce_sum(tf.cast(sims[:, None, :] > chosen[:, :, None], tf.float32), axis=-1)


def label_neighbours(sims, query_labels, bank_labels, k, fill="nearest"):
    """int32[B, k]: the constraint of CMSF-KM (labels = cluster ids), supervised CMSF and CMSF-Pseudo:
    the top-k of each row of `sims` among the bank rows whose label equals the query's (every row for a
    query label < 0), short sets filled by `fill` (see top_k_indices)."""
    return top_k_indices(sims, k, label_constraint(query_labels, bank_labels), fill)


def two_queue_neighbours(sims, previous_targets, previous_bank, k, k_prime):
    """int32[B, k]: CMSF-2Q's constraint. The candidates are the k' rows of the second bank M' nearest
    the previous view t'; of those, the k rows of the bank M most similar to the target t, read from
    `sims` (the [B, K] similarities of t to M: O(B k') beyond the searches). Equals the top-k of t in M
    under the B x K mask of the candidates."""
    candidates = nearest_neighbours(previous_targets, previous_bank, k_prime)
    return nearest_among_from_sims(sims, candidates, k)


def mean_shift_loss(queries, bank, indices):
    """Scalar: mean over b and k of 2 - 2 <q_b, bank[indices[b, k]]>.

    Only the selected rows are gathered, so the query side never forms a second B x K matrix.
    """
    rows = tf.gather(bank, indices)  # [B, k, D]
    sims = tf.einsum("bd,bkd->bk", queries, tf.cast(rows, queries.dtype))
    return tf.reduce_mean(2.0 - 2.0 * sims)


def view_group_losses(query_views, bank, sets):
    """[scalar per group]: each group's weighted mean-shift loss sum_w w * mean_shift_loss, averaged over its
    queries.

    `query_views`: [(n_v, [B * n_v, D] queries)], n_v (a Python int) views per image, image-major (the
    strong view: n_v = 1; --multi_crop's small crops: n_v = n), every view of image b pulled towards image
    b's neighbour sets `sets` [(w, int[B, k])]."""
    return [tf.add_n([w * mean_shift_loss(queries, bank, idx if n == 1 else tf.repeat(idx, n, axis=0))
                      for w, idx in sets])
            for n, queries in query_views]


def mean_over_views(views_per_group, group_losses):
    """Scalar: the plain mean of the per-view losses, each view counted once: sum_g n_g * loss_g / sum_g n_g
    (one group of one view: its loss, untouched)."""
    total = None
    for n, loss in zip(views_per_group, group_losses):
        total = n * loss if total is None else total + n * loss
    views = sum(views_per_group)
    return total if views == 1 else total / views


def purity(query_labels, bank_labels, indices):
    """Scalar float32: fraction of the neighbours whose bank label equals the query's label. A label < 0
    (unlabelled, or an empty bank slot) never counts as a match, not even with another -1."""
    query_labels = tf.convert_to_tensor(query_labels)
    nbr_labels = tf.cast(tf.gather(bank_labels, indices), query_labels.dtype)
    match = tf.logical_and(tf.equal(nbr_labels, query_labels[:, None]), (query_labels >= 0)[:, None])
    return tf.reduce_mean(tf.cast(match, tf.float32))


def l2_normalize(x):
    """Row-wise L2 normalisation, computed in float32 so that bfloat16/float16 features stay unit length."""
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


def pseudo_query_labels(labels, is_labelled, probabilities, threshold):
    """int32[B] query labels of CMSF-Pseudo: the ground truth for labelled examples; for the others the
    pseudo-label head's top-1 class if its probability reaches `threshold`, else -1 (unconstrained: the
    query falls back to the plain MSF neighbours, and as a bank row it never matches a label)."""
    probabilities = tf.cast(probabilities, tf.float32)
    pseudo = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    confident = tf.reduce_max(probabilities, axis=-1) >= threshold
    return tf.where(is_labelled, tf.cast(labels, tf.int32), tf.where(confident, pseudo, -1))


def chunked_top_k(queries, index, k, chunk=65536):
    """(float32 [B, k] similarities, int64 [B, k] row ids) of the k index rows with the largest dot product
    with each query, most similar first, ties to the smaller id. `index` [N, D] (N >= k; float32 or
    bfloat16, computed in float32) is read `chunk` rows at a time, so at most B x chunk similarities exist at
    once whatever N: the served k-NN's exact search in stock TensorFlow ops (no custom kernels to load)."""
    queries = tf.cast(queries, tf.float32)
    n = tf.shape(index, out_type=tf.int64)[0]
    batch = tf.shape(queries)[0]

    def body(start, best_sims, best_ids):
        rows = tf.cast(index[start:start + chunk], tf.float32)
        sims = tf.matmul(queries, rows, transpose_b=True)
        sims, ids = tf.math.top_k(sims, tf.minimum(k, tf.shape(rows)[0]))
        # The running best first: on equal similarity top_k keeps the earlier column, i.e. the smaller id.
        cand_sims = tf.concat([best_sims, sims], axis=1)
        cand_ids = tf.concat([best_ids, tf.cast(ids, tf.int64) + start], axis=1)
        best_sims, pos = tf.math.top_k(cand_sims, k)
        return start + chunk, best_sims, tf.gather(cand_ids, pos, batch_dims=1)

    start = tf.constant(0, tf.int64)
    best_sims = tf.fill([batch, k], tf.constant(-float("inf"), tf.float32))
    best_ids = tf.fill([batch, k], tf.constant(-1, tf.int64))
    _, sims, ids = tf.while_loop(lambda s, *_: s < n, body, (start, best_sims, best_ids),
                                 shape_invariants=(start.shape, tf.TensorShape([None, k]),
                                                   tf.TensorShape([None, k])))
    return sims, ids

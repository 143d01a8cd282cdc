"""k-NN classification of L2-normalised features with ScaNN (cosine similarity = dot product)."""

import time

import numpy as np
import tensorflow as tf

from cmsf_tf import ops
from cmsf_tf.eval.linear import top_k_accuracy


def features_and_labels(features, batches, progress=None, dim=None, names=None):
    """(float32 [N, D] unit-length features, int32 [N] labels) of (images, labels) batches
    (pipeline.eval_split), in one pass over the data. `features`: images -> [B, D] (raw backbone
    output); `progress(n)` is told the number of images done after each batch. With `names` (a list),
    the batches are (images, labels, names) and the decoded names are appended to it."""
    feats, labels, done = [], [], 0
    for batch in batches:
        images, batch_labels = batch[0], batch[1]
        if names is not None:
            names.extend(n.decode("utf-8", "replace") for n in batch[2].numpy())
        feats.append(ops.l2_normalize(tf.cast(features(images), tf.float32)).numpy())
        labels.append(np.asarray(batch_labels))
        done += len(labels[-1])
        if progress:
            progress(done)
    if not feats:
        return np.zeros((0, dim or 0), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(feats, axis=0), np.concatenate(labels).astype(np.int32)


def split_knn(features, source, image_size, batch_size, index_keep=None, query_keep=None, probe_seed=None):
    """({knn_top1_k1, knn_top1_k20, rankme}, index size, query count): k-NN top-1 of a source's test
    split (the `query_keep` part of it) against its training split (the `index_keep` part), majority
    vote, exact search, and the RankMe of the index's unit-length features (eval.spectrum: how many
    directions the representation uses): the k-NN of a training run's result and of its per-epoch
    curve. `features`: images -> [B, D]; the keep-functions as pipeline.eval_split takes them. With a
    `probe_seed`, also `linear_top1`: the paper's linear probe trained on the same cached features
    (eval.linear.cached_probe_top1)."""
    from cmsf_tf.data import pipeline
    from cmsf_tf.eval import spectrum

    index, index_labels = features_and_labels(
        features, pipeline.eval_split(source, "train", image_size, batch_size, keep=index_keep))
    queries, query_labels = features_and_labels(
        features, pipeline.eval_split(source, "test", image_size, batch_size, keep=query_keep))
    ks = tuple(k for k in (1, 20) if k <= len(index))  # a tiny training set has no 20-NN
    result = knn_accuracy(index, index_labels, queries, query_labels, ks=ks, num_classes=source.num_classes)
    result["rankme"] = round(spectrum.rankme(index), 2)
    if probe_seed is not None:
        from cmsf_tf.eval import linear

        result["linear_top1"] = linear.cached_probe_top1(index, index_labels, queries, query_labels, source.num_classes,
                                                         seed=probe_seed)
    return result, len(index), len(queries)


def approx_settings(n, k):
    """ScaNN settings of `approx` search scaled from the index size: ~sqrt(N) leaves of which a tenth
    (at least 32) are searched, anisotropic hashing with 2-dimensional blocks, exact re-ranking of a
    shortlist of max(50k, 250). Below 10,000 rows a tree does not pay: hashing + re-ranking alone.
    tools/bench_knn.py (1M x 512, k = 20): the shortlist decides the agreement with exact search
    (re-ranking 200: 98.1% of predicted labels, 1,000: 99.98%) while searching more leaves barely
    does; the search stays > 10x faster than brute force."""
    settings = {"reorder": max(50 * k, 250)}
    if n >= 10_000:
        leaves = int(np.sqrt(n))
        settings.update(num_leaves=leaves, num_leaves_to_search=min(leaves, max(leaves // 10, 32)),
                        training_sample_size=min(n, 250_000))
    return settings


def build_searcher(index_features, k, mode="exact", settings=None):
    """(ScaNN searcher over the rows of `index_features` by dot product, seconds it took to build).
    `settings` overrides entries of approx_settings (num_leaves, num_leaves_to_search, reorder, ...)."""
    import scann  # imported here: its TF custom ops take a moment to load and only evaluation needs them

    if k > len(index_features):
        raise ValueError(f"k={k} is larger than the index ({len(index_features)} rows)")
    if mode not in ("exact", "approx"):
        raise ValueError(f"unknown k-NN search mode {mode!r}; choose exact or approx")
    started = time.time()
    builder = scann.scann_ops_pybind.builder(np.ascontiguousarray(index_features, np.float32), k, "dot_product")
    searcher = configure_builder(builder, len(index_features), k, mode, settings).build()
    return searcher, time.time() - started


def configure_builder(builder, n, k, mode="exact", settings=None):
    """A ScaNN builder (pybind, or TF ops for a SavedModel) set up for `mode` over `n` rows."""
    if mode == "exact":
        return builder.score_brute_force()
    s = {**approx_settings(n, k), **(settings or {})}
    if "num_leaves" in s:
        builder = builder.tree(num_leaves=s["num_leaves"], num_leaves_to_search=s["num_leaves_to_search"],
                               training_sample_size=s["training_sample_size"])
    return builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(s["reorder"])


def search_with(searcher, query_features, k, leaves_to_search=None, reorder=None):
    """(int64 [Q, k] indices, float32 [Q, k] similarities) from a built searcher, most similar first.
    `leaves_to_search` / `reorder` override an approx searcher's settings for this call."""
    idx, sims = searcher.search_batched(np.ascontiguousarray(query_features, np.float32), final_num_neighbors=k,
                                        leaves_to_search=leaves_to_search, pre_reorder_num_neighbors=reorder)
    return idx.astype(np.int64), sims.astype(np.float32)


def search(index_features, query_features, k, mode="exact", with_similarities=False):
    """int64 [Q, k] indices of the k most similar index rows to each query, most similar first (and
    their float32 [Q, k] similarities with `with_similarities`)."""
    searcher, _ = build_searcher(index_features, k, mode)
    idx, sims = search_with(searcher, query_features, k)
    return (idx, sims) if with_similarities else idx


def vote_counts(neighbour_labels, num_classes, weights=None):
    """float64 [Q, classes]: per query, the number (or summed `weights`) of neighbours of each class."""
    counts = np.zeros((len(neighbour_labels), num_classes), np.float64)
    rows = np.broadcast_to(np.arange(len(neighbour_labels))[:, None], neighbour_labels.shape)
    np.add.at(counts, (rows, neighbour_labels), 1.0 if weights is None else weights)
    return counts


def majority_vote(neighbour_labels, num_classes):
    """The most frequent label among each row's neighbours; ties go to the smallest label. (The
    paper's code, self_supervised/eval_knn.py `faiss_knn`, shuffles the vote counts before taking the
    maximum, i.e. breaks ties at random; the deterministic rule makes runs repeatable and differs from
    it only on tied votes.)"""
    return vote_counts(neighbour_labels, num_classes).argmax(axis=1)


def weighted_vote_counts(neighbour_labels, similarities, num_classes, temperature=0.07):
    """Class scores of the similarity-weighted vote (InstDisc / DINO k-NN): each neighbour adds
    exp(similarity / temperature) to its class."""
    return vote_counts(neighbour_labels, num_classes, np.exp(similarities.astype(np.float64) / temperature))


def knn_report(index_features, index_labels, query_features, query_labels, ks=(1, 20), num_classes=None,
               mode="exact", vote="majority", temperature=0.07):
    """{f"knn_top1_k{k}": ..., f"knn_top5_k{k}" (k >= 5): ...} with `vote` majority or weighted."""
    if vote not in ("majority", "weighted"):
        raise ValueError(f"unknown k-NN vote {vote!r}; choose majority or weighted")
    index_labels, query_labels = np.asarray(index_labels), np.asarray(query_labels)
    num_classes = num_classes or int(max(index_labels.max(), query_labels.max())) + 1
    idx, sims = search(index_features, query_features, max(ks), mode, with_similarities=True)
    nbr_labels = index_labels[idx]
    out = {}
    for k in ks:
        if vote == "majority":
            scores = vote_counts(nbr_labels[:, :k], num_classes)
        else:
            scores = weighted_vote_counts(nbr_labels[:, :k], sims[:, :k], num_classes, temperature)
        accuracy = top_k_accuracy(scores, query_labels)  # ties to the smallest class (the paper's code: at random)
        out[f"knn_top1_k{k}"] = accuracy["top1"]
        if k >= 5 and "top5" in accuracy:  # top-5 of fewer neighbours or classes says nothing
            out[f"knn_top5_k{k}"] = accuracy["top5"]
    return out


def knn_accuracy(index_features, index_labels, query_features, query_labels, ks=(1, 20), num_classes=None,
                 mode="exact"):
    """{f"knn_top1_k{k}": top-1 accuracy in [0, 1]} for each k, by majority vote."""
    report = knn_report(index_features, index_labels, query_features, query_labels, ks, num_classes, mode)
    return {key: value for key, value in report.items() if key.startswith("knn_top1")}

"""k-NN classification of L2-normalised features with ScaNN (cosine similarity = dot product)."""

import numpy as np
import tensorflow as tf

from cmsf_tf import ops
from cmsf_tf.data import pipeline


def _encode(encoder):
    return tf.function(lambda x: ops.l2_normalize(encoder(x, training=False)))


def extract_features(encoder, images, image_size, batch_size=512):
    """float32 [N, D] unit-length features of uint8 `images` under the deterministic eval transform."""
    fn = _encode(encoder)
    chunks = [fn(batch).numpy() for batch in pipeline.eval_dataset(images, image_size, batch_size)]
    return np.concatenate(chunks, axis=0)


def features_and_labels(encoder, batches):
    """(float32 [N, D] unit-length features, int32 [N] labels) of (images, labels) batches
    (pipeline.eval_split), in one pass over the data."""
    fn = _encode(encoder)
    feats, labels = [], []
    for images, batch_labels in batches:
        feats.append(fn(images).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(feats, axis=0), np.concatenate(labels).astype(np.int32)


def search(index_features, query_features, k, mode="exact"):
    """int64 [Q, k] indices of the k most similar index rows to each query, most similar first."""
    import scann  # imported here: its TF custom ops take a moment to load and only evaluation needs them

    if k > len(index_features):
        raise ValueError(f"k={k} is larger than the index ({len(index_features)} rows)")
    n = len(index_features)
    builder = scann.scann_ops_pybind.builder(np.ascontiguousarray(index_features, np.float32), k, "dot_product")
    if mode == "exact":
        searcher = builder.score_brute_force().build()
    elif mode == "approx":
        # Partition into ~sqrt(N) leaves and search a quarter of them, score with anisotropic hashing
        # (2-dimensional blocks), then re-rank a shortlist exactly. Below ~10k rows a tree does not pay.
        if n >= 10_000:
            leaves = int(np.sqrt(n))
            builder = builder.tree(num_leaves=leaves, num_leaves_to_search=max(leaves // 4, 1),
                                   training_sample_size=min(n, 250_000))
        searcher = builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(max(10 * k, 100)).build()
    else:
        raise ValueError(f"unknown k-NN search mode {mode!r}; choose exact or approx")
    idx, _ = searcher.search_batched(np.ascontiguousarray(query_features, np.float32), final_num_neighbors=k)
    return idx.astype(np.int64)


def majority_vote(neighbour_labels, num_classes):
    """The most frequent label among each row's neighbours; ties go to the smallest label, like
    torch.mode in the reference evaluation code."""
    counts = np.zeros((len(neighbour_labels), num_classes), np.int64)
    np.add.at(counts, (np.arange(len(neighbour_labels))[:, None], neighbour_labels), 1)
    return counts.argmax(axis=1)


def knn_accuracy(index_features, index_labels, query_features, query_labels, ks=(1, 20), num_classes=None,
                 mode="exact"):
    """{f"knn_top1_k{k}": top-1 accuracy in [0, 1]} for each k, by majority vote."""
    num_classes = num_classes or int(max(index_labels.max(), query_labels.max())) + 1
    idx = search(index_features, query_features, max(ks), mode)
    nbr_labels = np.asarray(index_labels)[idx]
    return {f"knn_top1_k{k}": float(np.mean(majority_vote(nbr_labels[:, :k], num_classes) == query_labels))
            for k in ks}

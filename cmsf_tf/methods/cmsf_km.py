"""CMSF-KM: constrain the neighbours of t to bank rows whose image is in t's k-means cluster.

A per-image pool keeps each image's latest target embedding; at every epoch end
`callbacks.kmeans.KMeansClusters` clusters the pool (spherical k-means) into `cluster_ids` [N]. The
bank rows' clusters are looked up through their image indices, so they are always the current ones.
Before the first clustering every id is -1, which `label_constraint` treats as "unconstrained": the
loss is then MSF's. Loss = 1/2 constrained + 1/2 unconstrained.
"""

import keras
import tensorflow as tf

from cmsf_tf import ops
from cmsf_tf.memory import ImagePool
from cmsf_tf.methods.base import MeanShift


class CMSFKM(MeanShift):
    @classmethod
    def config_options(cls, cfg, num_images, num_classes):
        return dict(num_images=num_images, pool_dtype=cfg.pool_dtype)

    @classmethod
    def training_callbacks(cls, cfg, *, steps_per_epoch, logdir, log, jit_compile=False):
        from cmsf_tf.callbacks.kmeans import KMeansClusters

        return [KMeansClusters(cfg.num_clusters, cfg.kmeans_iters, cfg.seed, cfg.kmeans_init, logdir=logdir, log=log,
                               jit_compile=jit_compile)]

    def __init__(self, *, num_images, pool_dtype="float32", **kwargs):
        super().__init__(**kwargs)
        self.pool = ImagePool(num_images, self.embedding_dim, slots=1, dtype=pool_dtype, name="pool")
        self.cluster_ids = self.add_weight(shape=(num_images,), initializer=keras.initializers.Constant(-1),
                                           dtype="int32", trainable=False, aggregation="only_first_replica",
                                           name="cluster_ids")
        self.built = True

    def write_state(self, targets, labels, true_labels, indices, is_labelled):
        self.pool.write(indices, targets)

    def clusters_of(self, image_indices):
        image_indices = tf.cast(image_indices, tf.int64)
        ids = tf.gather(self.cluster_ids, tf.maximum(image_indices, 0))
        return tf.where(image_indices >= 0, ids, -1)

    def neighbour_sets(self, batch, targets, sims):
        constrained = self.label_neighbours(sims, self.clusters_of(batch["index"]),
                                            self.clusters_of(self.bank.image_indices))
        return [(0.5, constrained), (0.5, ops.top_k_indices(sims, self.topk))]

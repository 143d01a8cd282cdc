"""CMSF-KM's epoch-end clustering of the per-image pool, with its TensorBoard record."""

import keras
import numpy as np
import tensorflow as tf

from cmsf_tf import clustering, distribute


class KMeansClusters(keras.callbacks.Callback):
    """At every epoch end: spherical k-means of each image's latest target embedding (images not seen
    yet keep cluster -1 and are unconstrained), stored in `model.cluster_ids` (checkpointed with the
    model). Adds `kmeans_inertia` (mean 2 - 2 cos to the centroid) and `kmeans_empty` to the epoch
    logs; with a `logdir`, writes the cluster-size histogram. Must run before the checkpoint saver."""

    def __init__(self, num_clusters, iters=20, seed=0, init="random", chunk=8192, logdir=None, log=print,
                 jit_compile=False):
        super().__init__()
        self.jit_compile = jit_compile
        self.num_clusters, self.iters, self.seed, self.init, self.chunk = num_clusters, iters, seed, init, chunk
        self.writer = tf.summary.create_file_writer(logdir) if logdir else None
        self.log = log

    def on_train_begin(self, logs=None):
        if int(tf.reduce_max(self.model.cluster_ids)) < 0:
            self.log("cmsf_km: no clusters yet, so the constraint is off (loss = MSF) until the first epoch ends")

    def on_epoch_end(self, epoch, logs=None):
        with distribute.on_first_device(self.model.distribute_strategy):  # on the accelerator, not its host
            embeddings, seen = self.model.pool.latest()
            x = tf.boolean_mask(embeddings, seen)
            n = int(tf.shape(x)[0])
            k = min(self.num_clusters, n)
            if k < 1:
                return
            if k < self.num_clusters:
                self.log(f"cmsf_km: only {n} images seen, clustering them into {k} clusters")
            _, assignments, inertia = clustering.spherical_kmeans(
                tf.math.l2_normalize(x, axis=1), k, iters=self.iters, seed=self.seed + epoch, init=self.init,
                chunk=self.chunk, jit_compile=self.jit_compile)
        ids = tf.tensor_scatter_nd_update(tf.fill([self.model.pool.num_images], -1),
                                          tf.where(seen), assignments)
        self.model.cluster_ids.assign(ids)
        sizes = np.bincount(assignments.numpy(), minlength=k)
        if logs is not None:
            logs["kmeans_inertia"] = float(inertia) / n
            logs["kmeans_empty"] = float(np.sum(sizes == 0))
        if self.writer is not None:
            with self.writer.as_default(step=epoch + 1):
                tf.summary.histogram("kmeans/cluster_size", sizes.astype(np.float32))
                tf.summary.scalar("kmeans/inertia", float(inertia) / n)
                tf.summary.scalar("kmeans/largest_cluster", float(sizes.max()))
            self.writer.flush()

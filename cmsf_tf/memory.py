"""The memory bank: a ring buffer of past target embeddings with their labels and image indices.

All state is `add_weight` variables, so Keras tracks it and `tf.train.Checkpoint(model=...)` saves it.
Under tf.distribute the variables use ONLY_FIRST_REPLICA aggregation and the caller passes rows that
were already gathered from every replica (`distribute.gather`): each replica then writes the same
rows, and the single write that the strategy keeps is the complete one.
"""

import keras
import tensorflow as tf

from cmsf_tf import ops


class MemoryBank(keras.layers.Layer):
    """K rows of (embedding[D], label, true label, image index) plus a write pointer.

    `labels` is what constraints compare against (training label, cluster id, pseudo-label, -1 for
    none); `true_labels` is the ground truth, kept for monitoring only (purity), never for training.
    """

    def __init__(self, size, dim, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)
        self.dim = int(dim)
        keep_first = dict(trainable=False, aggregation="only_first_replica")
        # Random unit rows, as in the reference code, so the first searches are well defined.
        self.embeddings = self.add_weight(
            shape=(self.size, self.dim),
            initializer=_random_unit_rows(seed),
            name="embeddings",
            **keep_first,
        )
        self.labels = self.add_weight(
            shape=(self.size,), initializer=keras.initializers.Constant(-1), dtype="int32",
            name="labels", **keep_first)
        self.true_labels = self.add_weight(
            shape=(self.size,), initializer=keras.initializers.Constant(-1), dtype="int32",
            name="true_labels", **keep_first)
        self.image_indices = self.add_weight(
            shape=(self.size,), initializer=keras.initializers.Constant(-1), dtype="int64",
            name="image_indices", **keep_first)
        self.pointer = self.add_weight(
            shape=(), initializer="zeros", dtype="int64", name="pointer", **keep_first)
        # Everything is created above; without this Keras' symbolic build in fit() would call us.
        self.built = True

    def write(self, embeddings, labels, true_labels, image_indices):
        """Writes rows at the pointer (wrapping around) and advances it. Returns the row positions.

        The rows must be identical on every replica (gathered first); see the module docstring.
        """
        positions, _ = ring_write(self.pointer, self.size, (self.embeddings, embeddings), (self.labels, labels),
                                  (self.true_labels, true_labels), (self.image_indices, image_indices))
        return positions


def ring_write(pointer, size, *columns, count=None):
    """Writes the rows of each (variable, rows) column at `pointer` of a ring buffer of `size` rows
    (wrapping around) and advances the pointer: the write of MemoryBank and LabelledCache. With `count`
    (a scalar tensor) only the first `count` rows are new: the positions of the others are rewritten with
    what they hold and the pointer advances by `count`, so a variable number of rows is written with
    static shapes (XLA). Returns (int64 row positions, number of rows written). In place
    (scatter_update: a full assign would copy K x D every step; scatter_nd_update is not implemented for
    mirrored variables)."""
    n = tf.shape(columns[0][1], out_type=tf.int64)[0]
    positions = (pointer + tf.range(n, dtype=tf.int64)) % size
    fresh = None if count is None else tf.range(n, dtype=tf.int64) < count
    for variable, rows in columns:
        rows = tf.cast(rows, variable.dtype)
        if fresh is not None:
            keep = tf.reshape(fresh, [-1] + [1] * (rows.shape.rank - 1))
            rows = tf.where(keep, rows, tf.gather(variable, positions))
        variable.value.scatter_update(tf.IndexedSlices(rows, positions))
    written = n if count is None else count
    pointer.assign((pointer + written) % size)
    return positions, written


def _random_unit_rows(seed):
    def init(shape, dtype=None):
        rows = tf.random.stateless_normal(shape, seed=[seed, 0x6D656D], dtype=tf.float32)
        return tf.cast(ops.l2_normalize(rows), dtype or tf.float32)

    return init


class ImagePool(keras.layers.Layer):
    """Per-image target embeddings keyed by the stable dataset index: the `slots` most recent ones.

    `embeddings` [N * slots, D] (row = index * slots + slot) in `dtype` (bfloat16 halves the memory:
    ImageNet x 512 x 2 slots is 5.2 GB in float32, 2.6 GB in bfloat16); `writes` [N] counts the
    writes per image, so the newest slot is (writes - 1) % slots. Same distribution rules as the
    bank: ONLY_FIRST_REPLICA variables, written with gathered (identical) rows on every replica.
    """

    def __init__(self, num_images, dim, slots=1, dtype="float32", **kwargs):
        super().__init__(**kwargs)
        self.num_images, self.dim, self.slots = int(num_images), int(dim), int(slots)
        keep_first = dict(trainable=False, aggregation="only_first_replica")
        self.embeddings = self.add_weight(shape=(self.num_images * self.slots, self.dim), initializer="zeros",
                                          dtype=dtype, name="embeddings", **keep_first)
        self.writes = self.add_weight(shape=(self.num_images,), initializer="zeros", dtype="int32",
                                      name="writes", **keep_first)
        self.built = True

    def write(self, image_indices, embeddings):
        """Stores each image's new embedding in its next slot. Returns the rows written."""
        image_indices = tf.cast(image_indices, tf.int64)
        writes = tf.cast(tf.gather(self.writes, image_indices), tf.int64)
        rows = image_indices * self.slots + writes % self.slots
        self.embeddings.value.scatter_update(tf.IndexedSlices(tf.cast(embeddings, self.embeddings.dtype), rows))
        self.writes.value.scatter_update(tf.IndexedSlices(tf.cast(writes + 1, tf.int32), image_indices))
        return rows

    def previous(self, image_indices, fallback):
        """float32 [B, D]: each image's embedding before its newest one; `fallback` where there is none
        (fewer than two writes, or index < 0 for an empty bank row)."""
        image_indices = tf.cast(image_indices, tf.int64)
        known = image_indices >= 0
        safe = tf.where(known, image_indices, 0)
        writes = tf.cast(tf.gather(self.writes, safe), tf.int64)
        rows = safe * self.slots + (writes - 2) % self.slots
        have = tf.logical_and(known, writes >= 2)
        prev = tf.cast(tf.gather(self.embeddings, rows), tf.float32)
        return tf.where(have[:, None], prev, tf.cast(fallback, tf.float32))

    def latest(self):
        """(float32 [N, D] newest embedding per image, bool [N] written at least once)."""
        writes = tf.cast(tf.convert_to_tensor(self.writes), tf.int64)
        rows = tf.range(self.num_images, dtype=tf.int64) * self.slots + (writes - 1) % self.slots
        return tf.cast(tf.gather(self.embeddings, rows), tf.float32), writes > 0


class LabelledCache(keras.layers.Layer):
    """CMSF-Pseudo's cache of (target embedding, label) of the labelled images seen most recently: a ring
    buffer that takes a variable number of rows per step (the selected rows of the gathered batch).
    `filled` rows are valid. Same distribution rules as MemoryBank (ONLY_FIRST_REPLICA, gathered rows)."""

    def __init__(self, size, dim, **kwargs):
        super().__init__(**kwargs)
        self.size, self.dim = int(size), int(dim)
        keep_first = dict(trainable=False, aggregation="only_first_replica")
        self.embeddings = self.add_weight(shape=(self.size, self.dim), initializer="zeros", name="embeddings",
                                          **keep_first)
        self.labels = self.add_weight(shape=(self.size,), initializer=keras.initializers.Constant(-1),
                                      dtype="int32", name="labels", **keep_first)
        self.pointer = self.add_weight(shape=(), initializer="zeros", dtype="int64", name="pointer", **keep_first)
        self.filled = self.add_weight(shape=(), initializer="zeros", dtype="int64", name="filled", **keep_first)
        self.built = True

    def write(self, embeddings, labels, keep):
        """Appends the rows where `keep` (bool) is true, in their order. At most `size` rows per call.
        The kept rows are moved to the front rather than selected with boolean_mask, whose output shape
        depends on the data: XLA (TPUStrategy, jit_compile) can compile that only as a bounded dynamic
        shape, while these shapes are static."""
        keep = tf.convert_to_tensor(keep)
        order = tf.argsort(tf.cast(tf.logical_not(keep), tf.int32), stable=True)  # kept rows first, in order
        count = tf.reduce_sum(tf.cast(keep, tf.int64))
        _, n = ring_write(self.pointer, self.size, (self.embeddings, tf.gather(embeddings, order)),
                          (self.labels, tf.gather(tf.cast(labels, tf.int32), order)), count=count)
        self.filled.assign(tf.minimum(self.filled + n, self.size))

    def contents(self):
        """(float32 [filled, D] embeddings, int32 [filled] labels)."""
        n = int(self.filled.numpy())
        return self.embeddings.numpy()[:n], self.labels.numpy()[:n]

"""tf.data pipelines: an exactly resumable training stream of two views, and the evaluation stream."""

import tensorflow as tf

from cmsf_tf.data import augment


def example_seed(seed, epoch, index):
    """The stateless seed of one example's views in one epoch."""
    return tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64), tf.cast(index, tf.int64)])


def epoch_order(num_examples, seed, epoch):
    """The epoch's permutation of dataset indices: a pure function of (seed, epoch)."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def train_dataset(source, *, global_batch, image_size, seed, steps_per_epoch, start_epoch, end_epoch,
                  skip_steps=0, labels=None, crop_min_scale=0.2, blur_prob=0.5):
    """Batches of {weak, strong, label, true_label, index} from `start_epoch` (after `skip_steps` of
    it) to `end_epoch`, each epoch a fresh permutation. The stream is a pure function of its
    arguments, which is what makes mid-epoch resume exact.

    `labels` are the training labels (noisy or partial, -1 for unlabelled); defaults to the truth.
    """
    images = tf.constant(source.train_images)
    true_labels = tf.constant(source.train_labels, tf.int32)
    labels = true_labels if labels is None else tf.constant(labels, tf.int32)
    per_epoch = steps_per_epoch * global_batch

    def epoch_indices(epoch):
        order = epoch_order(source.num_train, seed, epoch)[:per_epoch]
        return tf.data.Dataset.from_tensor_slices((tf.fill([per_epoch], epoch), order))

    def example(epoch, index):
        image = images[index]
        s = tf.random.experimental.stateless_split(example_seed(seed, epoch, index), 2)
        return {
            "weak": augment.weak_view(image, image_size, s[0], crop_scale=(crop_min_scale, 1.0)),
            "strong": augment.strong_view(image, image_size, s[1], crop_scale=(crop_min_scale, 1.0),
                                          blur_p=blur_prob),
            "label": labels[index],
            "true_label": true_labels[index],
            "index": index,
        }

    ds = tf.data.Dataset.range(start_epoch, end_epoch).flat_map(epoch_indices)
    ds = ds.skip(skip_steps * global_batch)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(global_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(images, image_size, batch_size):
    """Deterministic eval-transformed images, in order."""
    ds = tf.data.Dataset.from_tensor_slices(images)
    ds = ds.map(lambda im: augment.eval_view(im, image_size), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

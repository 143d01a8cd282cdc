"""tf.data pipelines: an exactly resumable training stream of views, and the evaluation stream.

Every training example carries {weak, strong[, third], label, true_label, is_labelled, index}. The
stream is a pure function of (source, seed, epoch range, skip): a resumed run skips the batches it
already trained on and sees exactly the data, order and augmentations the uninterrupted run would have.

Multi-device: with an `input_context` (tf.distribute's `distribute_datasets_from_function`) each input
pipeline yields per-replica batches. For random-access sources every pipeline computes the same global
batch of indices and decodes only its own slice, so N workers train on exactly the batches one device
would. Record sources shard their files across pipelines instead (each worker reads only its shards).
"""


import numpy as np
import tensorflow as tf

from cmsf_tf.data import augment, sources
from cmsf_tf.data.labels import LabelPlan  # noqa: F401  (the pipeline applies it; tests import it from here)

AUTOTUNE = tf.data.AUTOTUNE


def example_seed(seed, epoch, index):
    """The stateless seed of one example's views in one epoch."""
    return tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64), tf.cast(index, tf.int64)])


def epoch_order(num_examples, seed, epoch):
    """The epoch's permutation of dataset indices: a pure function of (seed, epoch)."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def _true_labels(source):
    return None if source.train_labels is None else np.asarray(source.train_labels, np.int32)


def _pipelines(input_context):
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def small_crop_seeds(seed, epoch, index, n):
    """[n, 2] stateless seeds of one example's small crops (--multi_crop): folded off the example's seed,
    so the weak, strong and third views keep the seeds they have without small crops."""
    return tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(example_seed(seed, epoch, index), 1), n)


def _views(image, seed, epoch, index, image_size, crop_min_scale, blur_prob, third_view, strong_view=True,
           multi_crop=None):
    s = tf.random.experimental.stateless_split(example_seed(seed, epoch, index), 3)
    scale = (crop_min_scale, 1.0)
    small = small_crop_seeds(seed, epoch, index, multi_crop[0]) if multi_crop else None
    if image.dtype == tf.string:  # decode once the part of the image that the crops cover
        kinds = ([("weak", s[0], scale)] + ([("strong", s[1], scale)] if strong_view else [])
                 + ([("weak", s[2], scale)] if third_view else []))
        if multi_crop:
            kinds += [("strong", small[i], multi_crop[2:]) for i in range(multi_crop[0])]
        shape = augment.image_shape(image)
        image = augment.decoded_region(
            image, [augment.crop_window(shape, augment.crop_seed(k, v), sc) for k, v, sc in kinds])
    out = {"weak": augment.weak_view(image, image_size, s[0], crop_scale=scale)}
    if strong_view:  # the cross-entropy baseline trains on the weak view alone
        out["strong"] = augment.strong_view(image, image_size, s[1], crop_scale=scale, blur_p=blur_prob)
    if third_view:
        out["third"] = augment.weak_view(image, image_size, s[2], crop_scale=scale)
    if multi_crop:  # [n, size, size, 3]: the strong view's augmentation on a small crop
        n, size, low, high = multi_crop
        out["small"] = tf.stack([augment.strong_view(image, size, small[i], crop_scale=(low, high), blur_p=blur_prob)
                                 for i in range(n)])
    return out


def train_dataset(source, *, global_batch, image_size, seed, steps_per_epoch, start_epoch, end_epoch,
                  skip_steps=0, labels=None, crop_min_scale=0.2, blur_prob=0.5, third_view=False,
                  input_context=None, shuffle_buffer=10_000, strong_view=True, view_dtype=tf.uint8, multi_crop=None):
    """Batches of {weak, strong[, third][, small], label, true_label, is_labelled, index} (no strong with
    `strong_view=False`; the views pixel levels in `view_dtype`, uint8 or bfloat16 for devices without
    uint8 input such as TPUs, for augment.model_views in the train step) from `start_epoch`
    (after `skip_steps` of it) to `end_epoch`, each epoch freshly shuffled. `multi_crop` (n, size,
    min_scale, max_scale) adds `small`: [batch, n, size, size, 3] small crops per image.

    `labels`: a LabelPlan, or int32 [N] training labels (noisy or partial, -1 for unlabelled);
    defaults to the true labels. With an `input_context` the batches are per-replica batches of this
    input pipeline's share; without one they are global batches.
    """
    if labels is None:
        labels = LabelPlan(source.num_classes, labels=_true_labels(source))
    elif not isinstance(labels, LabelPlan):
        labels = LabelPlan(source.num_classes, labels=np.asarray(labels, np.int32))
    label_fn = labels.make_fn()
    pipelines, pipeline_id = _pipelines(input_context)
    if global_batch % pipelines:
        raise ValueError(f"global batch {global_batch} is not divisible by {pipelines} input pipelines")
    batch = input_context.get_per_replica_batch_size(global_batch) if input_context else global_batch
    view_args = dict(image_size=image_size, crop_min_scale=crop_min_scale, blur_prob=blur_prob,
                     third_view=third_view, strong_view=strong_view, multi_crop=multi_crop)

    if isinstance(source, sources.RecordSource):
        ds = _record_stream(source, seed, steps_per_epoch * global_batch // pipelines, start_epoch, end_epoch,
                            pipelines, pipeline_id, shuffle_buffer)
    else:
        ds = _indexed_stream(source, seed, steps_per_epoch * global_batch, global_batch, start_epoch, end_epoch,
                             pipelines, pipeline_id)
    ds = ds.skip(skip_steps * global_batch // pipelines)
    true_labels = None if isinstance(source, sources.RecordSource) else tf.constant(_true_labels(source))
    read = _reader(source)

    def example(epoch, index, payload):
        image, true_label, name = read(index, payload, true_labels)
        label = label_fn(index, true_label, name)
        out = {key: tf.cast(view, view_dtype) for key, view in _views(image, seed, epoch, index, **view_args).items()}
        out.update(label=label, true_label=tf.cast(true_label, tf.int32), is_labelled=label >= 0, index=index)
        return out

    ds = ds.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch, drop_remainder=True).prefetch(AUTOTUNE)


def _indexed_stream(source, seed, per_epoch, global_batch, start_epoch, end_epoch, pipelines, pipeline_id):
    """(epoch, index, index) of random-access sources; with several pipelines, each keeps its slice of
    every global batch (the slice of the replicas it feeds), so batches equal one device's."""
    share = global_batch // pipelines

    def epoch_indices(epoch):
        order = epoch_order(source.num_train, seed, epoch)[:per_epoch]
        if pipelines > 1:
            order = tf.reshape(tf.reshape(order, [-1, global_batch])[:, pipeline_id * share:(pipeline_id + 1) * share], [-1])
        return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(order), epoch), order, order))

    return tf.data.Dataset.range(start_epoch, end_epoch).flat_map(epoch_indices)


def _reader(source):
    """(index, payload, true_labels) -> (image uint8 or encoded bytes, true label, name)."""
    if isinstance(source, sources.InMemorySource):
        images = tf.constant(source.train_images)
        return lambda index, payload, true_labels: (
            tf.gather(images, index), tf.gather(true_labels, index), tf.strings.as_string(index))
    if isinstance(source, sources.FileSource):
        files = tf.constant(source.train_files)
        return lambda index, payload, true_labels: (
            tf.io.read_file(tf.gather(files, index)), tf.gather(true_labels, index), tf.gather(files, index))
    return lambda index, payload, true_labels: payload


# Our TFRecord schema (tools/folder_to_tfrecord.py writes it).
TFRECORD_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/index": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
}


def parse_tfrecord(record):
    x = tf.io.parse_single_example(record, TFRECORD_FEATURES)
    return x["image/index"], (x["image/encoded"], x["image/class/label"], x["image/filename"])


def _tfds_split(source, split):
    """(index, (encoded, label, name)) of a TFDS split in its fixed file order (index = position)."""
    import tensorflow_datasets as tfds

    ds = tfds.load(source.tfds_name, split=split, data_dir=source.data_dir or None, shuffle_files=False,
                   download=False, decoders={"image": tfds.decode.SkipDecoding()},
                   read_config=tfds.ReadConfig(interleave_cycle_length=1))
    name_key = "file_name" if "file_name" in ds.element_spec else None
    return ds.enumerate().map(lambda i, x: (i, (x["image"], x["label"],
                                                x[name_key] if name_key else tf.strings.as_string(i))))


def _record_stream(source, seed, per_epoch, start_epoch, end_epoch, pipelines, pipeline_id, shuffle_buffer):
    """(epoch, index, payload) of record sources. Each epoch: shards in a seeded order, a seeded shuffle
    buffer, then `per_epoch` examples. Deterministic, so skipping replays a resumed epoch exactly."""
    files = list(source.train_files)
    shard_files = source.kind == "tfrecord" and len(files) >= pipelines
    tfds_records = _tfds_split(source, "train") if source.kind == "tfds" else None

    def epoch_records(epoch):  # a Python int: tf.data shuffle seeds must be known when the graph is built
        epoch_seed = [int(seed), int(epoch)]
        if source.kind == "tfrecord":
            order = tf.random.experimental.stateless_shuffle(tf.constant(files), seed=epoch_seed)
            names = tf.data.Dataset.from_tensor_slices(order)
            if shard_files:
                names = names.shard(pipelines, pipeline_id)
            ds = names.interleave(tf.data.TFRecordDataset, cycle_length=min(16, len(files)),
                                  num_parallel_calls=AUTOTUNE, deterministic=True).map(parse_tfrecord)
        else:
            ds = tfds_records
        if pipelines > 1 and not shard_files:
            ds = ds.shard(pipelines, pipeline_id)  # every worker reads everything: use TFRecords at scale
        shuffle_seed = int(np.random.default_rng(epoch_seed).integers(2**31))
        ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        # A worker's shards may hold fewer than its share of an epoch: repeat rather than end early.
        return ds.repeat().take(per_epoch).map(lambda index, payload: (tf.constant(epoch, tf.int64), index, payload))

    ds = epoch_records(start_epoch)
    for epoch in range(start_epoch + 1, end_epoch):
        ds = ds.concatenate(epoch_records(epoch))
    return ds


def eval_split(source, split, image_size, batch_size, keep=None, with_names=False):
    """Batches of (eval-view images, int32 labels) of a source's "train" or "test" split, read in one
    pass: in index order for random-access sources, file order for record sources. `keep`: a tf
    function (index, label, name) -> bool selecting examples (e.g. the labelled subset) before decoding.
    `with_names`: (images, labels, names) with each image's file name (its index for arrays)."""
    if isinstance(source, (sources.InMemorySource, sources.FileSource)):
        train = split == "train"
        if isinstance(source, sources.InMemorySource):
            images = source.train_images if train else source.test_images
            names = np.arange(len(images)).astype(str)
        else:
            images = source.train_files if train else source.test_files
            names = images
        labels = source.train_labels if train else source.test_labels
        ds = tf.data.Dataset.from_tensor_slices(
            (np.arange(len(labels), dtype=np.int64), (images, np.asarray(labels, np.int32), names)))
    else:
        if source.kind == "tfds":
            ds = _tfds_split(source, "train" if split == "train" else source.test_split)
        else:
            ds = tf.data.TFRecordDataset(list(source.train_files if split == "train" else source.test_files))
            ds = ds.map(parse_tfrecord)
    if keep is not None:
        ds = ds.filter(lambda index, payload: keep(index, tf.cast(payload[1], tf.int32), payload[2]))
    ds = ds.map(lambda index, payload: (payload[0], tf.cast(payload[1], tf.int32), payload[2]))
    if isinstance(source, sources.FileSource):
        ds = ds.map(lambda path, label, name: (tf.io.read_file(path), label, name), num_parallel_calls=AUTOTUNE)
    ds = ds.map(lambda image, label, name: (augment.eval_view(image, image_size), label, name),
                num_parallel_calls=AUTOTUNE)
    if not with_names:
        ds = ds.map(lambda image, label, name: (image, label))
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def labelled_dataset(source, labels, image_size, batch_size, seed, epoch, crop_min_scale=0.08):
    """One epoch of (weak view, int32 label) batches of the examples `labels` (a LabelPlan; None: every
    example with its true label) marks as labelled, freshly shuffled per (seed, epoch); the last batch
    may be smaller. Random-access sources read only the labelled examples; record sources are read
    whole and filtered."""
    if labels is None:
        labels = LabelPlan(source.num_classes, labels=_true_labels(source))
    label_fn = labels.make_fn()
    if isinstance(source, sources.RecordSource):
        read = lambda index, payload, true_labels: payload  # noqa: E731
        ds = _record_stream(source, seed, source.num_train, epoch, epoch + 1, 1, 0, 10_000)
        true_labels = None
    else:
        read = _reader(source)
        true_labels = tf.constant(_true_labels(source))
        chosen = np.flatnonzero(np.asarray(labels.labels) >= 0) if labels.labels is not None else np.arange(source.num_train)
        order = tf.gather(tf.constant(chosen, tf.int64), epoch_order(len(chosen), seed, epoch))
        ds = tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(order), tf.constant(epoch, tf.int64)), order, order))

    def example(epoch_, index, payload):
        image, true_label, name = read(index, payload, true_labels)
        return image, label_fn(index, true_label, name), index

    ds = ds.map(example, num_parallel_calls=AUTOTUNE, deterministic=True).filter(lambda image, label, index: label >= 0)

    def view(image, label, index):  # float views: these heads train on the input cores' output as is
        return augment.to_model_input(augment.weak_view(image, image_size, example_seed(seed, epoch, index),
                                                        crop_scale=(crop_min_scale, 1.0))), label

    return ds.map(view, num_parallel_calls=AUTOTUNE, deterministic=True).batch(batch_size).prefetch(AUTOTUNE)

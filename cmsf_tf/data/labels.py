"""Which labels training may use, as plain arguments: the labelled subset (--label_split percent:P or a
file of image names), label noise (--label_noise P or a corruption list) and the LabelPlan the pipeline
applies per example. NumPy only (LabelPlan.make_fn imports TensorFlow when it builds the lookup), so the
flag checks, training and evaluation share it without depending on one another.
"""

import dataclasses
import os

import numpy as np

from cmsf_tf.data import splits
from cmsf_tf.errors import UserError


class LabelError(UserError, ValueError):
    """A label setting that cannot be used; the message is one sentence for the user."""


def split_percent(label_split):
    """P of a label split of the form percent:P (0 < P <= 100); None for a names file (a shipped split
    or an existing file); LabelError for anything else."""
    kind, _, number = label_split.partition(":")
    if kind != "percent" and os.path.isfile(splits.split_path(label_split)):
        return None
    try:
        percent = float(number) if kind == "percent" else None
    except ValueError:
        percent = None
    if percent is None or not 0 < percent <= 100:
        raise LabelError(f"--label_split {label_split!r} is neither percent:P with 0 < P <= 100, "
                         f"{' nor '.join(splits.NAMED_SPLITS)}, nor an existing file of image names")
    return percent


@dataclasses.dataclass(frozen=True)
class LabelPlan:
    """How an example's training label follows from (index, true label, name), inside the pipeline.

    `labels` (int32 [N]) when they can be computed up front (sources whose labels are known); otherwise
    `shift` (label noise: label = (true + shift[index]) mod C) and a labelled subset given by index
    (`labelled`, bool [N]) or by image name (`labelled_names`). Unlabelled examples get label -1.
    """

    num_classes: int
    labels: object = None
    shift: object = None
    labelled: object = None
    labelled_names: tuple = ()

    def make_fn(self):
        """A tf function (index, true_label, name) -> training label."""
        import tensorflow as tf

        if self.labels is not None:
            table = tf.constant(self.labels, tf.int32)
            return lambda index, true_label, name: tf.gather(table, index)
        shift = None if self.shift is None else tf.constant(self.shift, tf.int32)
        labelled = None if self.labelled is None else tf.constant(self.labelled, tf.bool)
        names = None
        if self.labelled_names:
            names = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(list(self.labelled_names)),
                                                    tf.ones([len(self.labelled_names)], tf.int32)), 0)

        def fn(index, true_label, name):
            label = tf.cast(true_label, tf.int32)
            if shift is not None:
                label = (label + tf.gather(shift, index)) % self.num_classes
            keep = tf.constant(True)
            if labelled is not None:
                keep = tf.gather(labelled, index)
            if names is not None:
                keep = names.lookup(_name_key(name)) > 0
            return tf.where(keep, label, splits.UNLABELLED)
        return fn


def _name_key(path):
    import tensorflow as tf

    """sources.image_name in TF: file name without directories and extension."""
    base = tf.strings.split(tf.strings.regex_replace(path, r"\\", "/"), "/")[-1]
    return tf.strings.regex_replace(base, r"\.[^.]*$", "")


def training_labels(source, label_split="", label_noise=0.0, label_noise_file="", seed=0, dataset=""):
    """The LabelPlan of the labels training may use: noisy with `label_noise` percent (or the corruption
    list `label_noise_file`), -1 outside `label_split`, all drawn with `seed`. Computed up front
    (stratified split, split file checked against the data) when the source knows its labels and names;
    applied per example while streaming otherwise (TFDS ImageNet). `dataset` names the data in errors."""
    from cmsf_tf.data.sources import image_name

    percent = split_percent(label_split) if label_split else None
    names = splits.read_names(label_split) if label_split and percent is None else None
    if source.train_labels is None:
        if label_noise_file:
            raise LabelError(f"--label_noise_file needs labels known up front, which {dataset} "
                             "streams; convert it with tools/folder_to_tfrecord.py")
        plan = dict(num_classes=source.num_classes)
        if label_noise:
            plan["shift"] = splits.noise_shift(source.num_train, label_noise, source.num_classes, seed)
        if percent is not None:
            plan["labelled"] = splits.random_split(source.num_train, percent, seed)
        if names is not None:
            plan["labelled_names"] = tuple(sorted({image_name(n) for n in names}))
        return LabelPlan(**plan)
    labels = source.train_labels
    if label_noise:
        labels = splits.noisy_labels(labels, label_noise, source.num_classes, seed)
    if label_noise_file:
        try:
            labels = splits.corrupted_labels(labels, source.train_names, splits.read_corruptions(label_noise_file),
                                             source.num_classes)
        except ValueError as e:
            raise LabelError(f"--label_noise_file: {e}") from None
    if percent is not None:
        labels = splits.training_labels(labels, splits.percent_split(source.train_labels, percent, seed))
    elif names is not None:
        try:
            labelled = splits.names_split(source.train_names, names)
        except ValueError as e:
            raise LabelError(f"--label_split {label_split}: {e}") from None
        labels = splits.training_labels(labels, labelled)
    return LabelPlan(source.num_classes, labels=np.asarray(labels, np.int32))

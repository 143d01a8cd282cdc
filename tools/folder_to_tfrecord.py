"""Convert an ImageNet-style folder (train/<class>/*, val/<class>/*) into sharded TFRecords.

    python tools/folder_to_tfrecord.py --data_dir=/data/imagenet --output_dir=/data/imagenet-tfr \
        [--train_shards=1024 --val_shards=128 --class_list=imagenet100 --workers=16]

Every image is decoded once here, so a corrupt file that passes the folder source's quick header/trailer
check is caught now (skipped and named) instead of stopping a training run. Training examples get the
stable index 0..N-1 in the folder source's order (sorted class, then file name), and are written in a
seeded random order so every shard mixes classes. Schema (cmsf_tf.data.pipeline.TFRECORD_FEATURES):
image/encoded (bytes, the original file), image/class/label (int64), image/index (int64),
image/filename (bytes). index.json lists the shards, the class names, and each training index's label
and name (what label splits and noise need without reading the records).
"""

import concurrent.futures
import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmsf_tf.data import sources  # noqa: E402

flags.DEFINE_string("data_dir", None, "Folder with train/<class>/ and val/<class>/.")
flags.DEFINE_string("output_dir", None, "Where the shards and index.json go.")
flags.DEFINE_integer("train_shards", 1024, "Training shards (ImageNet: 1024, about 140 MB each).")
flags.DEFINE_integer("val_shards", 128, "Validation shards.")
flags.DEFINE_string("class_list", "", "Only these classes (imagenet100, imagenet100_cmc, or a file of folder names).")
flags.DEFINE_integer("workers", 16, "Threads reading and checking images.")
flags.DEFINE_integer("seed", 0, "Seed of the order of the examples in the shards.")
flags.mark_flags_as_required(["data_dir", "output_dir"])
FLAGS = flags.FLAGS


def _read_checked(path):
    """(bytes, None) of a decodable image, or (None, reason)."""
    import tensorflow as tf

    try:
        data = tf.io.read_file(path)
        tf.io.decode_image(data, channels=3, expand_animations=False)
        return data.numpy(), None
    except (tf.errors.OpError, OSError) as e:
        return None, str(e).strip().splitlines()[0][:200]


def _example(encoded, label, index, name):
    import tensorflow as tf

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": feature(encoded), "image/class/label": feature(label), "image/index": feature(index),
        "image/filename": feature(name.encode())})).SerializeToString()


def convert_split(files, labels, output_dir, prefix, num_shards, workers, seed, log=print):
    """Writes the readable images of one split; returns (shard names, labels, names, skipped)."""
    import tensorflow as tf

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        checked = []
        for i, result in enumerate(pool.map(_read_checked, files)):
            checked.append(result)
            if (i + 1) % 1000 == 0 or i + 1 == len(files):
                print(f"\r{prefix}: checked {i + 1}/{len(files)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    skipped = [(f, reason) for f, (_, reason) in zip(files, checked) if reason]
    for path, reason in skipped:
        log(f"warning: skipping {path}: {reason}")
    kept = [(f, lab, data) for f, lab, (data, _) in zip(files, labels, checked) if data is not None]
    num_shards = max(1, min(num_shards, len(kept)))
    order = np.random.default_rng(seed).permutation(len(kept))  # index = position in `kept`
    shard_names = [f"{prefix}-{s:05d}-of-{num_shards:05d}.tfrecord" for s in range(num_shards)]
    for s, name in enumerate(shard_names):
        with tf.io.TFRecordWriter(os.path.join(output_dir, name)) as writer:
            for index in order[s::num_shards]:
                path, label, data = kept[index]
                writer.write(_example(data, label, index, sources.image_name(path)))
        print(f"\r{prefix}: wrote shard {s + 1}/{num_shards}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return shard_names, [lab for _, lab, _ in kept], [sources.image_name(f) for f, _, _ in kept], skipped


def main(argv):
    del argv
    try:
        # The quick check is off here (fraction 1): every file is fully decoded below instead.
        src = sources.load_folder(FLAGS.data_dir, FLAGS.class_list, max_corrupt_fraction=1.0)
    except sources.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    for path, reason in src.skipped:
        print(f"warning: skipping {path}: {reason}", file=sys.stderr)
    train = convert_split(list(src.train_files), list(src.train_labels), FLAGS.output_dir, "train",
                          FLAGS.train_shards, FLAGS.workers, FLAGS.seed)
    val = convert_split(list(src.test_files), list(src.test_labels), FLAGS.output_dir, "val",
                        FLAGS.val_shards, FLAGS.workers, FLAGS.seed)
    info = {"class_names": list(src.class_names),
            "splits": {"train": {"files": train[0], "count": len(train[1]), "labels": [int(x) for x in train[1]],
                                 "names": train[2]},
                       "val": {"files": val[0], "count": len(val[1])}}}
    with open(os.path.join(FLAGS.output_dir, sources.TFRECORD_INFO), "w") as f:
        json.dump(info, f)
    print(f"wrote {len(train[1])} training and {len(val[1])} validation images in "
          f"{len(train[0]) + len(val[0])} shards to {FLAGS.output_dir} "
          f"({len(src.skipped) + len(train[3]) + len(val[3])} corrupt images skipped)")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)

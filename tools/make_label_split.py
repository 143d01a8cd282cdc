"""Write a label-split file: the names of a class-stratified P% of a data set's training images.

    python tools/make_label_split.py --dataset=folder --data_dir=/data/imagenet --percent=10 \
        --seed=0 --output=splits/imagenet_10pct_seed0.txt

The file has one image name per line (file name without extension, as the official ImageNet 1% / 10%
lists; the index for data sets without file names), so `--label_split=<file>` fixes the labelled subset
independently of --seed and can be shared. For ImageNet itself prefer the official lists.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmsf_tf.data import sources, splits  # noqa: E402
from cmsf_tf.errors import UserError  # noqa: E402

flags.DEFINE_string("dataset", "fashion_mnist", "Data set, as for cmsf_tf.train (not a streamed TFDS set).")
flags.DEFINE_string("data_dir", "", "Its directory.")
flags.DEFINE_string("class_list", "", "Only these classes (--dataset=folder).")
flags.DEFINE_float("percent", 10.0, "Percent of the training images to label.")
flags.DEFINE_integer("seed", 0, "Seed of the choice.")
flags.DEFINE_string("output", None, "File to write.")
flags.mark_flag_as_required("output")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        src = sources.load(FLAGS.dataset, FLAGS.data_dir, FLAGS.class_list)
        if src.train_labels is None:
            raise sources.DataError(f"{FLAGS.dataset} is streamed and its labels are not known up front; "
                                    "convert it to TFRecords or use the official split files")
        keep = splits.percent_split(src.train_labels, FLAGS.percent, FLAGS.seed)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    names = src.train_names[keep]
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        f.write("".join(f"{n}\n" for n in names))
    print(f"wrote {len(names)} of {src.num_train} image names ({FLAGS.percent}%, seed {FLAGS.seed}) to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)

"""Are two runs bit-identical? Compares every variable of the newest checkpoints of two run directories
(weights, optimizer slots, banks, pools, caches): the check that a refactoring changed no behaviour.

    python tools/compare_checkpoints.py RUN_A RUN_B      # exit 0 when identical, 1 otherwise

Train both with the same flags and --deterministic (e.g. --epochs=2 --steps_per_epoch=4 --noknn_eval), one
with each version of the code.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def variables(run_dir):
    import tensorflow as tf

    from cmsf_tf.rundir import RunDir

    path = tf.train.latest_checkpoint(RunDir(run_dir).checkpoints)
    if path is None:
        sys.exit(f"error: {run_dir} has no checkpoint")
    reader = tf.train.load_checkpoint(path)
    return path, {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
                  if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


def main():
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args()
    (path_a, a), (path_b, b) = variables(args.run_a), variables(args.run_b)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]))
    for name in differ[:20]:
        gap = np.max(np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))) if a[name].shape == b[name].shape else "shape"
        print(f"differs: {name} (max |a - b| {gap})")
    for label, names in (("only in A", only_a), ("only in B", only_b)):
        if names:
            print(f"{label}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    same = not (differ or only_a or only_b)
    print(f"{'identical' if same else 'DIFFERENT'}: {len(a)} variables of {path_a} vs {path_b}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

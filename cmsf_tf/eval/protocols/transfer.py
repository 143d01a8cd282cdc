"""transfer: L2-regularised logistic regression (L-BFGS) on frozen features of other data sets, the L2
chosen on a held-out part of each training set; a table and its mean."""

import numpy as np

from cmsf_tf.settings import OPEN_UNIT, Setting, numbers

NAME = "transfer"
# The paper's transfer data sets that TFDS has (FGVC Aircraft is not in TFDS: add it as folder:PATH).
TRANSFER_DATASETS = ("cifar10", "cifar100", "food101", "sun397", "cars196", "dtd", "oxford_iiit_pet",
                     "caltech101", "oxford_flowers102")
SETTINGS = (
    Setting("transfer_datasets", "list", list(TRANSFER_DATASETS),
            "transfer: TFDS names, or folder:PATH / tfrecord:PATH.", convert=lambda name, values: tuple(values)),
    Setting("transfer_data_dir", "string", "",
            "transfer: TFDS data dir of the transfer data sets."),
    Setting("transfer_l2", "list", ["0", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"],
            "transfer: L2 strengths tried.", convert=numbers),
    Setting("transfer_val_fraction", "float", 0.2,
            "transfer: part of each training set held out to choose the L2.", rule=OPEN_UNIT),
    Setting("transfer_max_iter", "integer", 1000,
            "transfer: L-BFGS iterations at most per fit (it stops earlier "
            "once the largest gradient entry is below 1e-6).", minimum=1),
)


def transfer_source(name, data_dir):
    """(dataset, data_dir) of a --transfer_datasets entry: a TFDS name, tfds:NAME, folder:PATH or tfrecord:PATH."""
    kind, _, path = name.partition(":")
    if kind in ("folder", "tfrecord") and path:
        return kind, path
    return (name if kind == "tfds" else f"tfds:{name}"), data_dir


def run(ctx, cfg, log):
    from cmsf_tf.eval import linear
    from cmsf_tf.eval.context import load_source

    loaded = []
    for name in cfg.transfer_datasets:  # every data set is checked before the first is evaluated
        dataset, data_dir = transfer_source(name, cfg.transfer_data_dir)
        loaded.append((name, dataset, load_source(dataset, data_dir)))
    table = {}
    for name, dataset, source in loaded:
        train_x, train_y = ctx.features(source, dataset, "train")
        test_x, test_y = ctx.features(source, dataset, "test")
        log(f"logistic regression on {name}: {len(train_x)} training, {len(test_x)} test images")
        table[name] = linear.logistic_regression(train_x, train_y, test_x, test_y, source.num_classes,
                                                 cfg.transfer_l2, cfg.transfer_val_fraction, cfg.seed,
                                                 cfg.transfer_max_iter)
        log(f"  {name}: top-1 {100 * table[name]['top1']:.1f}% (l2 {table[name]['l2']:g})")
    mean = float(np.mean([r["top1"] for r in table.values()]))
    return {"top1": mean, "mean_top1": mean, "datasets": table,
            "settings": {"l2_candidates": list(cfg.transfer_l2), "val_fraction": cfg.transfer_val_fraction,
                         "max_iter": cfg.transfer_max_iter,
                         "solver": "L-BFGS to convergence (max gradient entry < 1e-6), warm-started path",
                         "features": "L2-normalised, standardised by the training set"}}


def summary_lines(result):
    from cmsf_tf.eval.protocols import accuracy_lines

    return accuracy_lines(result) + [f"  {name:<20} {100 * r['top1']:6.2f}%   (l2 {r['l2']:g})"
                                     for name, r in result["datasets"].items()]

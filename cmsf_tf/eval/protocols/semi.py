"""semi: the paper's semi-supervised protocol — a frozen backbone and an MLP head trained on the labelled
subset of --label_split, 20 epochs, lr 0.001, weight decay 1e-4; the best and the last epoch."""

from cmsf_tf.errors import UserError
from cmsf_tf.settings import FRACTION, NOT_NEGATIVE, POSITIVE, Setting, integers

NAME = "semi"
SETTINGS = (
    Setting("semi_epochs", "integer", 20,
            "semi: epochs of head training on the labelled subset (paper: 20).", minimum=1),
    Setting("semi_lr", "float", 0.001,
            "semi: SGD learning rate, momentum 0.9 (paper: 0.001).", rule=POSITIVE),
    Setting("semi_milestones", "list", ["15", "35", "50"],
            "semi: epochs after which the lr is divided by 10 (paper: "
            "15,35,50, of which 20 epochs reach 15).", convert=integers(0, allow_empty=True)),
    Setting("semi_batch_size", "integer", 256,
            "semi: batch size (paper: 256).", minimum=1),
    Setting("semi_weight_decay", "float", 1e-4,
            "semi: SGD weight decay on every head parameter (paper: 1e-4).", rule=NOT_NEGATIVE),
    Setting("semi_crop_min_scale", "float", 0.08,
            "semi: smallest area fraction of the training crops (paper: 0.08).", rule=FRACTION),
)


def check(cfg):
    if cfg.saved_model:
        raise UserError(f"{NAME} needs a training checkpoint (--model_dir of a run), not a SavedModel")


def run(ctx, cfg, log):
    from cmsf_tf.data import pipeline
    from cmsf_tf.eval import linear, semi

    enc, dataset, seed, label_split = ctx.encoder, ctx.dataset, ctx.seed, ctx.label_split
    source = ctx.labelled_source("the semi-supervised protocol")
    plan, keep, subset, count = ctx.labelled_subset(source)
    labelled_x, _ = ctx.features(source, dataset, "train", keep, subset, count)
    count = len(labelled_x)
    steps = -(-count // cfg.semi_batch_size)
    log(f"semi-supervised evaluation on {count} labelled images ({label_split or 'all labels'}): "
        f"{cfg.semi_epochs} epochs of {steps} steps, frozen backbone, MLP head")
    result = semi.train_and_evaluate(
        enc.backbone, enc.feature_dim, source.num_classes, linear.standardizer(labelled_x),
        lambda epoch: pipeline.labelled_dataset(source, plan, enc.image_size, cfg.semi_batch_size, seed, epoch,
                                                cfg.semi_crop_min_scale),
        lambda: pipeline.eval_split(source, "test", enc.image_size, cfg.eval_batch_size),
        steps, cfg.semi_epochs, cfg.semi_lr, cfg.semi_milestones, 0.9, cfg.semi_weight_decay, seed, log)
    return {**result, "dataset": dataset, "labelled_images": count,
            "selection": "top1/top5: the best epoch on the test split, as the paper's semi_supervised/eval_linear.py "
                         "reports; top1_last: the last epoch",
            "settings": {"label_split": label_split or "all", "epochs": cfg.semi_epochs, "lr": cfg.semi_lr,
                         "momentum": 0.9, "milestones": list(cfg.semi_milestones), "batch_size": cfg.semi_batch_size,
                         "weight_decay": cfg.semi_weight_decay,
                         "views": f"random resized crop ({cfg.semi_crop_min_scale:g}-1) + flip",
                         "backbone": "frozen weights, BatchNorm in training mode (batch statistics, moving averages "
                                     "updated)",
                         "head": "L2 norm, standardise, Linear(c, c), BatchNorm, ReLU, Linear(c, classes)"}}


def summary_lines(result):
    from cmsf_tf.eval.protocols import accuracy_lines

    return accuracy_lines(result)

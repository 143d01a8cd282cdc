"""finetune: full fine-tuning — the whole network and a new linear head on the labelled subset, cosine
schedule (not the paper's protocol; its semi-supervised one is `semi`)."""

from cmsf_tf.errors import UserError
from cmsf_tf.settings import FRACTION, NOT_NEGATIVE, POSITIVE, Setting

NAME = "finetune"
SETTINGS = (
    Setting("finetune_epochs", "integer", 20,
            "finetune: epochs of full fine-tuning (backbone and head; not the "
            "paper's semi-supervised protocol, which is `semi`).", minimum=1),
    Setting("finetune_lr", "float", 0.001,
            "finetune: backbone learning rate, cosine decay.", rule=POSITIVE),
    Setting("finetune_head_lr", "float", 0.01,
            "finetune: learning rate of the new linear head.", rule=POSITIVE),
    Setting("finetune_batch_size", "integer", 256,
            "finetune: batch size.", minimum=1),
    Setting("finetune_weight_decay", "float", 0.0,
            "finetune: L2 penalty on every weight.", rule=NOT_NEGATIVE),
    Setting("finetune_crop_min_scale", "float", 0.08,
            "finetune: smallest area fraction of the random resized crops "
            "(0.08: the supervised ImageNet setting; small images need more, e.g. 0.5 at 28 px).", rule=FRACTION),
)


def check(cfg):
    if cfg.saved_model:
        raise UserError(f"{NAME} needs a training checkpoint (--model_dir of a run), not a SavedModel")


def run(ctx, cfg, log):
    from cmsf_tf.data import pipeline
    from cmsf_tf.eval import finetune
    from cmsf_tf.eval.context import labelled_count

    enc, seed, label_split = ctx.encoder, ctx.seed, ctx.label_split
    source = ctx.labelled_source("fine-tuning")
    plan = ctx.label_plan(source)
    count = labelled_count(plan, source)
    steps = -(-count // cfg.finetune_batch_size)
    log(f"fine-tuning on {count} labelled images ({label_split or 'all labels'}): {cfg.finetune_epochs} epochs")
    head, history = finetune.finetune(
        enc.backbone, enc.feature_dim, source.num_classes,
        lambda epoch: pipeline.labelled_dataset(source, plan, enc.image_size, cfg.finetune_batch_size, seed, epoch,
                                                cfg.finetune_crop_min_scale),
        steps, cfg.finetune_epochs, cfg.finetune_lr, cfg.finetune_head_lr, 0.9, cfg.finetune_weight_decay, log)
    result = finetune.evaluate(enc.backbone, head,
                               pipeline.eval_split(source, "test", enc.image_size, cfg.eval_batch_size))
    return {**result, "dataset": ctx.dataset, "labelled_images": count, "loss_per_epoch": history,
            "settings": {"label_split": label_split or "all", "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr,
                         "head_lr": cfg.finetune_head_lr, "momentum": 0.9, "schedule": "cosine",
                         "batch_size": cfg.finetune_batch_size, "weight_decay": cfg.finetune_weight_decay,
                         "views": f"random resized crop ({cfg.finetune_crop_min_scale:g}-1) + flip"}}


def summary_lines(result):
    from cmsf_tf.eval.protocols import accuracy_lines

    return accuracy_lines(result)

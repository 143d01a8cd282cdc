"""linear: the paper's linear probe — random resized crops (or cached centre crops with
--nolinear_augment), L2-normalised features standardised by the training set, SGD 40 epochs, lr 0.01,
weight decay 1e-4, drops at 15/30; the best and the last epoch."""

from cmsf_tf.settings import FRACTION, NOT_NEGATIVE, POSITIVE, Setting, integers

NAME = "linear"
SETTINGS = (
    Setting("linear_epochs", "integer", 40,
            "linear: epochs (paper: 40).", minimum=1),
    Setting("linear_lr", "float", 0.01,
            "linear: SGD learning rate, momentum 0.9 (paper: 0.01).", rule=POSITIVE),
    Setting("linear_milestones", "list", ["15", "30"],
            "linear: epochs after which the lr is divided by 10 (paper: "
            "15,30).", convert=integers(0, allow_empty=True)),
    Setting("linear_batch_size", "integer", 256,
            "linear: batch size (paper: 256).", minimum=1),
    Setting("linear_weight_decay", "float", 1e-4,
            "linear: SGD weight decay on weight and bias (paper: 1e-4).", rule=NOT_NEGATIVE),
    Setting("linear_augment", "bool", True,
            "linear: train on features of a fresh random resized crop + flip of every "
            "image every epoch (the paper's probe: one backbone pass per image per epoch); "
            "--nolinear_augment: on cached centre-crop features (fast, not the paper's)."),
    Setting("linear_crop_min_scale", "float", 0.08,
            "linear: smallest area fraction of the training crops (paper: "
            "0.08, torchvision's default).", rule=FRACTION),
)


def run(ctx, cfg, log):
    from cmsf_tf.data import pipeline
    from cmsf_tf.eval import linear, semi

    enc, dataset, seed = ctx.encoder, ctx.dataset, ctx.seed
    source = ctx.labelled_source("the linear probe")
    train_x, train_y = ctx.features(source, dataset, "train")
    test_x, test_y = ctx.features(source, dataset, "test")
    stats = linear.standardizer(train_x)
    steps = -(-len(train_x) // cfg.linear_batch_size)
    if cfg.linear_augment:
        import tensorflow as tf

        mean, std = (tf.constant(s, tf.float32) for s in stats)
        embed = tf.function(lambda x: (tf.math.l2_normalize(tf.cast(enc.features(x), tf.float32), -1) - mean) / std)

        def batches(epoch):
            for images, labels in pipeline.labelled_dataset(source, None, enc.image_size, cfg.linear_batch_size,
                                                            seed, 1000 + epoch, cfg.linear_crop_min_scale):
                yield embed(images), labels
    else:
        batches = linear.cached_batches(linear.standardize(train_x, stats), train_y, cfg.linear_batch_size, seed)
    test_z = linear.standardize(test_x, stats)
    per_epoch = []
    log(f"linear probe: {cfg.linear_epochs} epochs of {steps} steps "
        f"({'random resized crops' if cfg.linear_augment else 'cached centre-crop features'})")
    head = linear.train_probe(batches, train_x.shape[1], source.num_classes, steps, cfg.linear_epochs, cfg.linear_lr,
                              0.9, cfg.linear_milestones, cfg.linear_weight_decay, seed, log,
                              on_epoch_end=lambda epoch, h: per_epoch.append(linear.top_k_accuracy(h.predict(test_z), test_y)))
    train_acc = linear.top_k_accuracy(head.predict(linear.standardize(train_x, stats)), train_y, (1,))["top1"]
    return {**semi.summarize(per_epoch), "train_top1": train_acc, "dataset": dataset,
            "selection": "top1/top5: the best epoch on the test split, as the paper's eval_linear.py reports; "
                         "top1_last: the last epoch",
            "settings": {"epochs": cfg.linear_epochs, "lr": cfg.linear_lr, "momentum": 0.9,
                         "milestones": list(cfg.linear_milestones), "batch_size": cfg.linear_batch_size,
                         "weight_decay": cfg.linear_weight_decay, "augment": cfg.linear_augment,
                         "views": (f"random resized crop ({cfg.linear_crop_min_scale:g}-1) + flip" if cfg.linear_augment
                                   else "cached centre crops"),
                         "features": "L2-normalised, standardised by the training set (sqrt(var + 1e-5))"}}


def summary_lines(result):
    from cmsf_tf.eval.protocols import accuracy_lines

    return accuracy_lines(result)

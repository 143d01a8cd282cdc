"""Evaluate a representation: python -m cmsf_tf.evaluate {knn,linear,finetune,transfer} --model_dir=RUN

The network is the online backbone of the run's newest checkpoint (--checkpoint, --encoder=target, or
--saved_model for an export). Data: the run's data set and label split unless --dataset/--data_dir/
--label_split say otherwise. Each protocol writes --model_dir/eval/<protocol>.json (accuracies, the exact
settings, the network's origin and step, wall time) and TensorBoard scalars under tensorboard/eval.

  knn       1-NN / 20-NN top-1 (top-5 for k >= 5) of L2-normalised backbone features, ScaNN retrieval
  linear    the paper's linear probe (random resized crops, standardised features, SGD 40 epochs, lr 0.01,
            wd 1e-4, drops at 15/30; best and last epoch)
  semi      the paper's semi-supervised protocol: frozen backbone + MLP head on the labelled subset
            (--label_split), 20 epochs, lr 0.001, wd 1e-4; best and last epoch
  finetune  full fine-tuning: whole network + linear head on the labelled subset (not the paper's protocol)
  transfer  L2-regularised logistic regression (L-BFGS) on frozen features of other data sets, table + mean
  projector TensorBoard projector files (features, metadata.tsv, sprite) of a split, and eval/neighbours.png:
            the bank neighbours of some training images, plain beside the method's constrained set
"""

import hashlib
import json
import os
import sys
import time

import numpy as np

from cmsf_tf import config


class _Log:
    def __call__(self, message):
        print(message, file=sys.stderr, flush=True)


def data_settings(cfg, info):
    """(dataset, data_dir, class_list, label_split, seed): the command line's, else the run's."""
    run = info.get("run", {})
    pick = lambda name, default="": getattr(cfg, name) if getattr(cfg, name) is not None else run.get(name, default)  # noqa: E731
    dataset = pick("dataset", None)
    if dataset is None:
        raise config.UsageError("--dataset is needed: the SavedModel does not record its training data")
    return dataset, pick("data_dir"), pick("class_list"), pick("label_split"), run.get("seed", cfg.seed)


def load_source(dataset, data_dir, class_list=""):
    from cmsf_tf.data import sources

    try:
        source = sources.load(dataset, data_dir, class_list)
    except sources.DataError as e:
        raise config.UsageError(str(e)) from None
    shape = getattr(source, "image_shape", None)
    if shape is not None and shape[-1] not in (1, 3):
        raise config.UsageError(f"{dataset} has images with {shape[-1]} channels; the network takes RGB "
                                "(grey images are replicated to 3 channels)")
    return source


def label_plan(source, dataset, label_split, seed):
    """LabelPlan of the labelled subset (true labels, -1 elsewhere), as the training run drew it."""
    from cmsf_tf.data import labels

    try:
        return labels.training_labels(source, label_split or "", seed=seed, dataset=dataset)
    except labels.LabelError as e:
        raise config.UsageError(str(e)) from None


def labelled_subset(source, dataset, label_split, seed):
    """(plan, keep, subset name, count) of the labelled training images of `label_split` (all images
    when it is empty): `keep` is the pipeline filter for Features, None for all."""
    plan = label_plan(source, dataset, label_split, seed)
    if not label_split:
        return plan, None, "all", labelled_count(plan, source)
    fn = plan.make_fn()
    return (plan, lambda index, label, name: fn(index, label, name) >= 0, f"labelled:{label_split}",
            labelled_count(plan, source))


def labelled_count(plan, source):
    if plan.labels is not None:
        return int(np.sum(np.asarray(plan.labels) >= 0))
    if plan.labelled is not None:
        return int(np.sum(plan.labelled))
    return len(plan.labelled_names) if plan.labelled_names else source.num_train


class Features:
    """Extracts (and with --cache_features keeps in eval/features/) L2-normalised features of a split."""

    def __init__(self, encoder, cfg, log):
        self.encoder, self.cfg, self.log = encoder, cfg, log
        self.dir = os.path.join(cfg.model_dir, "eval", "features")

    def __call__(self, source, dataset, split, keep=None, keep_name="all", count=None):
        """`count`: how many images `keep` selects, when known (for the progress line)."""
        import keras

        from cmsf_tf.data import pipeline
        from cmsf_tf.eval import knn

        identity = {"network": {k: self.encoder.info.get(k) for k in ("kind", "path", "step", "encoder")},
                    "dataset": dataset, "split": split, "subset": keep_name, "image_size": self.encoder.image_size}
        key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(self.dir, f"{dataset.replace(':', '_').replace('/', '_')}_{split}_{key}.npz")
        if self.cfg.cache_features and os.path.isfile(path):
            cached = np.load(path)
            self.log(f"{split} features of {dataset} from {path}")
            return cached["features"], cached["labels"]
        total = count or (source.num_train if split == "train" else source.num_test)
        bar = keras.utils.Progbar(total, verbose=1 if sys.stderr.isatty() else 0, unit_name="image")
        self.log(f"extracting {split} features of {dataset} ({total} images) ...")
        feats, labels = knn.features_and_labels(
            self.encoder.features,
            pipeline.eval_split(source, split, self.encoder.image_size, self.cfg.eval_batch_size, keep),
            progress=lambda n: bar.update(min(n, total)), dim=self.encoder.feature_dim)
        if self.cfg.cache_features:
            os.makedirs(self.dir, exist_ok=True)
            np.savez(path, features=feats, labels=labels, identity=json.dumps(identity))
        return feats, labels


# ----- protocols -----
def labelled_source(source, dataset, what):
    """`source`, refused in one sentence when its training images have no labels."""
    from cmsf_tf.data import sources

    if not sources.has_train_labels(source):
        raise config.UsageError(sources.no_labels_reason(source, dataset, what))
    return source


def run_knn(cfg, enc, features, log):
    from cmsf_tf.data import sources
    from cmsf_tf.eval import knn, spectrum

    dataset, data_dir, class_list, label_split, seed = data_settings(cfg, enc.info)
    source = load_source(dataset, data_dir, class_list)
    if not sources.has_train_labels(source):
        if cfg.index_split == "labelled":
            raise config.UsageError(sources.no_labels_reason(source, dataset, "--index_split=labelled"))
        unlabelled, source = source, sources.knn_source(source)
        if source is None:
            raise config.UsageError(sources.no_labels_reason(unlabelled, dataset, "k-NN evaluation"))
        log(f"{dataset}'s training images have no labels: k-NN over the labelled val/ split "
            f"({source.num_train} images as the index, {source.num_test} as queries)")
    keep, subset, count = None, "all", None
    if cfg.index_split == "labelled":
        if not label_split:
            raise config.UsageError("--index_split=labelled needs a --label_split (the run has none)")
        _, keep, subset, count = labelled_subset(source, dataset, label_split, seed)
    index, index_labels = features(source, dataset, "train", keep, subset, count)
    queries, query_labels = features(source, dataset, "test")
    if max(cfg.knn_k) > len(index):
        raise config.UsageError(f"--knn_k {max(cfg.knn_k)} is larger than the index ({len(index)} images)")
    log(f"k-NN ({cfg.knn_search} search, {cfg.knn_vote} vote) over {len(index)} images ...")
    report = knn.knn_report(index, index_labels, queries, query_labels, ks=cfg.knn_k,
                            num_classes=source.num_classes, mode=cfg.knn_search, vote=cfg.knn_vote,
                            temperature=cfg.knn_temperature)
    k = max(cfg.knn_k)  # the headline numbers are the largest k's
    headline = {"top1": report[f"knn_top1_k{k}"]}
    if f"knn_top5_k{k}" in report:
        headline["top5"] = report[f"knn_top5_k{k}"]
    return {**headline, **report, "rankme": round(spectrum.rankme(index), 2), "feature_dim": enc.feature_dim,
            "dataset": dataset, "index_size": len(index), "queries": len(queries),
            "settings": {"k": list(cfg.knn_k), "vote": cfg.knn_vote, "temperature": cfg.knn_temperature,
                         "search": cfg.knn_search, "index_split": subset}}


def run_linear(cfg, enc, features, log):
    from cmsf_tf.data import pipeline
    from cmsf_tf.eval import linear, semi

    dataset, data_dir, class_list, _, seed = data_settings(cfg, enc.info)
    source = labelled_source(load_source(dataset, data_dir, class_list), dataset, "the linear probe")
    train_x, train_y = features(source, dataset, "train")
    test_x, test_y = features(source, dataset, "test")
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


def run_semi(cfg, enc, features, log):
    from cmsf_tf.data import pipeline
    from cmsf_tf.eval import linear, semi

    dataset, data_dir, class_list, label_split, seed = data_settings(cfg, enc.info)
    source = labelled_source(load_source(dataset, data_dir, class_list), dataset, "the semi-supervised protocol")
    plan, keep, subset, count = labelled_subset(source, dataset, label_split, seed)
    labelled_x, _ = features(source, dataset, "train", keep, subset, count)
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


def run_finetune(cfg, enc, features, log):
    from cmsf_tf.data import pipeline
    from cmsf_tf.eval import finetune

    dataset, data_dir, class_list, label_split, seed = data_settings(cfg, enc.info)
    source = labelled_source(load_source(dataset, data_dir, class_list), dataset, "fine-tuning")
    plan = label_plan(source, dataset, label_split, seed)
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
    return {**result, "dataset": dataset, "labelled_images": count, "loss_per_epoch": history,
            "settings": {"label_split": label_split or "all", "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr,
                         "head_lr": cfg.finetune_head_lr, "momentum": 0.9, "schedule": "cosine",
                         "batch_size": cfg.finetune_batch_size, "weight_decay": cfg.finetune_weight_decay,
                         "views": f"random resized crop ({cfg.finetune_crop_min_scale:g}-1) + flip"}}


def transfer_source(name, data_dir):
    kind, _, path = name.partition(":")
    if kind in ("folder", "tfrecord") and path:
        return kind, path
    return (name if kind == "tfds" else f"tfds:{name}"), data_dir


def run_transfer(cfg, enc, features, log):
    from cmsf_tf.eval import linear

    loaded = []
    for name in cfg.transfer_datasets:  # every data set is checked before the first is evaluated
        dataset, data_dir = transfer_source(name, cfg.transfer_data_dir)
        loaded.append((name, dataset, load_source(dataset, data_dir)))
    table = {}
    for name, dataset, source in loaded:
        train_x, train_y = features(source, dataset, "train")
        test_x, test_y = features(source, dataset, "test")
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


def display_image(source, split, index, image_size):
    """float32 [S, S, 3] in [0, 1]: image `index` of a random-access source as the network sees it
    (the evaluation view, before normalisation)."""
    import tensorflow as tf

    from cmsf_tf.data import augment, sources

    train = split == "train"
    if isinstance(source, sources.InMemorySource):
        image = tf.constant((source.train_images if train else source.test_images)[index])
    else:
        image = tf.io.read_file((source.train_files if train else source.test_files)[index])
    return augment.eval_view(image, image_size) * augment.IMAGENET_STD + augment.IMAGENET_MEAN


def run_projector(cfg, enc, features, log):
    """TensorBoard projector files (features, metadata, sprite) of an evenly spaced sample of a split, and
    the grid of a checkpoint's bank neighbours (plain beside the method's constrained set)."""
    import tensorflow as tf

    from cmsf_tf import ops
    from cmsf_tf.data import augment, pipeline, sources
    from cmsf_tf.eval import projector

    dataset, data_dir, class_list, label_split, seed = data_settings(cfg, enc.info)
    source = load_source(dataset, data_dir, class_list)
    split, size = cfg.projector_split, enc.image_size
    total = source.num_train if split == "train" else source.num_test
    chosen = projector.evenly_spaced(total, cfg.projector_images)
    plan = label_plan(source, dataset, label_split, seed)
    label_fn = plan.make_fn() if split == "train" else (lambda index, label, name: label)
    selected = tf.constant(np.isin(np.arange(total), chosen))
    side = projector.thumbnail_side(len(chosen), size)
    log(f"embedding {len(chosen)} {split} images of {dataset} for the projector ...")
    feats, meta, thumbs = [], {"index": [], "label": [], "true_label": [], "class": [], "file_name": []}, []
    class_names = getattr(source, "class_names", None)
    for images, true_labels, names in pipeline.eval_split(source, split, size, cfg.eval_batch_size,
                                                          keep=lambda index, label, name: selected[index],
                                                          with_names=True):
        feats.append(ops.l2_normalize(tf.cast(enc.features(images), tf.float32)).numpy())
        thumbs.append(projector.thumbnails(images * augment.IMAGENET_STD + augment.IMAGENET_MEAN, side))
        meta["true_label"].extend(true_labels.numpy().tolist())
        meta["file_name"].extend(n.decode("utf-8", "replace") for n in names.numpy())
    index = chosen[:len(meta["true_label"])]  # eval_split keeps the split's order: the chosen ones, ascending
    meta["index"] = index.tolist()
    meta["label"] = label_fn(tf.constant(index), tf.constant(meta["true_label"], tf.int32),
                             tf.constant(meta["file_name"] or [""], tf.string)[:len(index)]).numpy().tolist()
    meta["class"] = [class_names[t] if class_names else str(t) for t in meta["true_label"]]
    feats, thumbs = np.concatenate(feats), np.concatenate(thumbs)

    out_dir = os.path.join(cfg.model_dir, "tensorboard", "projector")
    result = {"dataset": dataset, "split": split, "images": len(feats), "projector_dir": out_dir,
              "settings": {"split": split, "images": cfg.projector_images, "queries": cfg.projector_queries,
                           "features": "L2-normalised backbone features (before the projector)"}}
    grid = None
    if cfg.projector_queries and enc.info.get("kind") == "checkpoint":
        if not isinstance(source, (sources.InMemorySource, sources.FileSource)):
            log(f"no neighbour grid: {dataset} is read as a stream, and the bank's images need random access")
        else:
            grid, found = neighbours_of_bank(cfg, enc, source, plan, log)
            result["neighbours"] = found
    projector.write_projector(out_dir, feats, meta, thumbs, grid=grid)
    log(f"projector files in {out_dir} (tensorboard --logdir {os.path.join(cfg.model_dir, 'tensorboard')}, "
        "Projector tab)")
    return result


def neighbours_of_bank(cfg, enc, source, plan, log):
    """(grid image, JSON-able record) of the bank neighbours of evenly spaced training images."""
    import tensorflow as tf

    from cmsf_tf.data import augment
    from cmsf_tf.eval import projector

    try:
        model, run_cfg = projector.restore_training_model(cfg.model_dir, enc.info["path"], source, plan)
    except ValueError as e:
        log(f"no neighbour grid: {e}")
        return None, None
    queries = projector.evenly_spaced(source.num_train, cfg.projector_queries)
    label_fn = plan.make_fn()
    names = [str(source.train_files[i]) for i in queries] if hasattr(source, "train_files") else queries.astype(str)
    true = np.asarray(source.train_labels)[queries].astype(np.int32)
    labels = label_fn(tf.constant(queries), tf.constant(true), tf.constant(list(names), tf.string)).numpy()
    shown = [display_image(source, "train", int(i), enc.image_size) for i in queries]
    views = tf.stack([augment.normalize(x) for x in shown])
    found = projector.bank_neighbours(model, views, queries, labels, true, labels >= 0, run_cfg.topk)
    true_of = lambda i: int(source.train_labels[i]) if i >= 0 else -1  # noqa: E731
    blank = np.zeros((enc.image_size, enc.image_size, 3), np.float32)
    grid = projector.neighbour_grid(
        np.stack([x.numpy() for x in shown]), true, found,
        lambda i: display_image(source, "train", int(i), enc.image_size).numpy() if i >= 0 else blank, true_of)
    path = os.path.join(cfg.model_dir, "eval", "neighbours.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(grid))
    record = {"png": path, "method": run_cfg.method, "k": run_cfg.topk, "queries": queries.tolist(),
              "query_true_labels": true.tolist()}
    for kind in ("plain", "constrained"):
        if f"{kind}_rows" in found:
            images = found[f"{kind}_images"]
            record[kind] = {"bank_rows": found[f"{kind}_rows"].tolist(), "images": images.tolist(),
                            "similarities": np.round(found[f"{kind}_sims"], 5).tolist(),
                            "true_labels": [[true_of(i) for i in row] for row in images],
                            "purity": (float(np.mean([[true_of(i) == t for i in row] for row, t in zip(images, true)]))
                                       if (true >= 0).all() else None)}  # unlabelled images: no purity
    summary = ", ".join(f"{kind} {100 * record[kind]['purity']:.0f}% same class" for kind in ("plain", "constrained")
                        if kind in record and record[kind]["purity"] is not None) or "no labels"
    log(f"bank neighbours of {len(queries)} training images ({summary}): {path}")
    return grid, record


PROTOCOL_FNS = {"knn": run_knn, "linear": run_linear, "semi": run_semi, "finetune": run_finetune,
                "transfer": run_transfer, "projector": run_projector}


def load_encoder(cfg):
    from cmsf_tf.eval import encoder as encoders

    if not os.path.isdir(cfg.model_dir) and not cfg.saved_model:
        raise config.UsageError(f"--model_dir {cfg.model_dir} does not exist")
    if cfg.saved_model:
        enc = encoders.from_saved_model(cfg.saved_model)
    else:
        try:
            enc = encoders.from_checkpoint(cfg.model_dir, cfg.checkpoint or None, cfg.encoder)
        except encoders.NotARunError as e:  # only here is an export the other way in
            raise config.UsageError(f"{e}, or an export with --saved_model") from None
    if cfg.image_size is not None and cfg.image_size != enc.image_size:
        raise config.UsageError(f"the network takes {enc.image_size} px images, --image_size says {cfg.image_size}")
    return enc


def evaluate(cfg, log=_Log()):
    """Runs one protocol; returns the dict written to eval/<protocol>.json."""
    started = time.time()
    from cmsf_tf.eval import encoder as encoders

    try:
        enc = load_encoder(cfg)
        features = Features(enc, cfg, log)
        result = PROTOCOL_FNS[cfg.protocol](cfg, enc, features, log)
    except encoders.EncoderError as e:
        raise config.UsageError(str(e)) from None
    result = {"protocol": cfg.protocol, **result,
              "network": {k: v for k, v in enc.info.items() if k != "run"},
              "wall_time_s": round(time.time() - started, 1)}
    out_dir = os.path.join(cfg.model_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{cfg.protocol}.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_summaries(cfg, result, enc.info.get("step") or 0)
    return result


def write_summaries(cfg, result, step):
    import tensorflow as tf

    writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "tensorboard", "eval"))
    scalars = {k: v for k, v in result.items() if isinstance(v, float) and k != "wall_time_s"}
    for name, r in result.get("datasets", {}).items():
        scalars[f"top1_{name.replace(':', '_').replace('/', '_')}"] = r["top1"]
    with writer.as_default():
        for name, value in scalars.items():
            tf.summary.scalar(f"eval/{cfg.protocol}/{name}", value, step=step)
    writer.close()


def summary_lines(result):
    if "top1" not in result:  # projector
        lines = [f"{result['protocol']}: {result['images']} {result['split']} images in {result['projector_dir']}"]
        for kind in ("plain", "constrained"):
            if (result.get("neighbours") or {}).get(kind, {}).get("purity") is not None:
                lines.append(f"  {kind} bank neighbours: {100 * result['neighbours'][kind]['purity']:.0f}% of the "
                             "query's class")
        return lines
    lines = [f"{result['protocol']}: top-1 {100 * result['top1']:.2f}%"
             + (f", top-5 {100 * result['top5']:.2f}%" if "top5" in result else "")]
    if "best_epoch" in result:
        lines.append(f"  best epoch {result['best_epoch']} (chosen on the test split, as the paper's code does); "
                     f"last epoch: top-1 {100 * result['top1_last']:.2f}%")
    for key in sorted(k for k in result if k.startswith("knn_top")):
        lines.append(f"  {key}: {100 * result[key]:.2f}%")
    if "rankme" in result:
        lines.append(f"  RankMe of the index's features: {result['rankme']:.1f} of {result['feature_dim']} dimensions")
    for name, r in result.get("datasets", {}).items():
        lines.append(f"  {name:<20} {100 * r['top1']:6.2f}%   (l2 {r['l2']:g})")
    return lines


def main(argv):
    if len(argv) != 2:
        print(f"usage: python -m cmsf_tf.evaluate {{{','.join(config.PROTOCOLS)}}} --model_dir=RUN [--flags]",
              file=sys.stderr)
        sys.exit(2)
    try:
        cfg = config.eval_from_flags(argv[1])
        result = evaluate(cfg)
    except config.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2))
    print("\n".join(summary_lines(result)))


def cli():
    """The `cmsf-evaluate` console script: `python -m cmsf_tf.evaluate`."""
    config.run_entry_point(main)


if __name__ == "__main__":
    cli()

"""projector: TensorBoard projector files (features, metadata.tsv, sprite) of an evenly spaced sample of a
split, and eval/neighbours.png: the bank neighbours of some training images, plain beside the method's
constrained set."""

import os

import numpy as np

from cmsf_tf.settings import Setting

NAME = "projector"
SETTINGS = (
    Setting("projector_split", "string", "train",
            "projector: the split whose images are embedded (train: metadata shows training "
            "labels beside true ones).", choices=("train", "test")),
    Setting("projector_images", "integer", 2000,
            "projector: how many images (evenly spaced over the split).", minimum=1),
    Setting("projector_queries", "integer", 8,
            "projector: training images whose bank neighbours (plain and constrained) are drawn "
            "in eval/neighbours.png (0: none).", minimum=0),
)


def display_image(source, split, index, image_size):
    """float32 [S, S, 3] in [0, 1]: image `index` of a random-access source as the network sees it
    (the evaluation view, before normalisation)."""
    import tensorflow as tf

    from cmsf_tf.data import augment

    return (augment.eval_view(tf.constant(source.raw_image(split, index)), image_size) * augment.IMAGENET_STD
            + augment.IMAGENET_MEAN)


def run(ctx, cfg, log):
    import tensorflow as tf

    from cmsf_tf import ops
    from cmsf_tf.data import augment, pipeline
    from cmsf_tf.eval import projector

    enc, dataset = ctx.encoder, ctx.dataset
    source = ctx.source()
    split, size = cfg.projector_split, enc.image_size
    total = source.num_train if split == "train" else source.num_test
    chosen = projector.evenly_spaced(total, cfg.projector_images)
    plan = ctx.label_plan(source)
    label_fn = plan.make_fn() if split == "train" else (lambda index, label, name: label)
    selected = tf.constant(np.isin(np.arange(total), chosen))
    side = projector.thumbnail_side(len(chosen), size)
    log(f"embedding {len(chosen)} {split} images of {dataset} for the projector ...")
    feats, meta, thumbs = [], {"index": [], "label": [], "true_label": [], "class": [], "file_name": []}, []
    class_names = source.class_names or None
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

    out_dir = ctx.run.projector_dir
    result = {"dataset": dataset, "split": split, "images": len(feats), "projector_dir": out_dir,
              "settings": {"split": split, "images": cfg.projector_images, "queries": cfg.projector_queries,
                           "features": "L2-normalised backbone features (before the projector)"}}
    grid = None
    if cfg.projector_queries and enc.info.get("kind") == "checkpoint":
        if not source.random_access:
            log(f"no neighbour grid: {dataset} is read as a stream, and the bank's images need random access")
        else:
            grid, found = neighbours_of_bank(ctx, cfg, source, plan, log)
            result["neighbours"] = found
    projector.write_projector(out_dir, feats, meta, thumbs, grid=grid)
    log(f"projector files in {out_dir} (tensorboard --logdir {ctx.run.tensorboard}, Projector tab)")
    return result


def neighbours_of_bank(ctx, cfg, source, plan, log):
    """(grid image, JSON-able record) of the bank neighbours of evenly spaced training images."""
    import tensorflow as tf

    from cmsf_tf.data import augment
    from cmsf_tf.eval import projector

    enc = ctx.encoder
    try:
        model, run_cfg = projector.restore_training_model(cfg.model_dir, enc.info["path"], source, plan)
    except ValueError as e:
        log(f"no neighbour grid: {e}")
        return None, None
    queries = projector.evenly_spaced(source.num_train, cfg.projector_queries)
    label_fn = plan.make_fn()
    names = source.train_example_names(queries)
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
    path = ctx.run.neighbours_png
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


def summary_lines(result):
    lines = [f"{result['protocol']}: {result['images']} {result['split']} images in {result['projector_dir']}"]
    for kind in ("plain", "constrained"):
        if (result.get("neighbours") or {}).get(kind, {}).get("purity") is not None:
            lines.append(f"  {kind} bank neighbours: {100 * result['neighbours'][kind]['purity']:.0f}% of the "
                         "query's class")
    return lines

"""Looking at embeddings: files for TensorBoard's projector, and the grid of a method's neighbours.

`write_projector` writes features, metadata.tsv and (for images) a sprite with a projector_config.pbtxt,
in a directory TensorBoard lists as a run. `bank_neighbours` restores a training checkpoint whole (bank,
pools, clusters) and asks the method itself for its neighbour sets of some training images: the plain
top-k of the target embedding in the bank and, for constrained methods, the constrained set — the
paper's figure of "distant yet related" neighbours. `neighbour_grid` draws them.
"""

import json
import os

import numpy as np
import tensorflow as tf

from cmsf_tf import ops

SPRITE_MAX_SIDE = 8192  # TensorBoard's projector refuses larger sprites


def evenly_spaced(total, count):
    """int64 [min(total, count)] indices spread over range(total) (a fixed, class-balanced-ish sample)."""
    count = min(total, count)
    return np.unique(np.linspace(0, total - 1, count).round().astype(np.int64)) if count else np.zeros(0, np.int64)


def thumbnail_side(count, image_size, max_side=SPRITE_MAX_SIDE):
    """Side of each thumbnail in the sprite of `count` images: their own size, or less so that the
    ceil(sqrt(count))-wide grid fits in max_side x max_side."""
    return int(min(image_size, max_side // int(np.ceil(np.sqrt(max(count, 1))))))


def thumbnails(images01, side):
    """uint8 [B, side, side, 3] of float images in [0, 1] (grey replicated)."""
    images = tf.image.resize(tf.convert_to_tensor(_rgb(images01), tf.float32), (side, side), antialias=True)
    return tf.image.convert_image_dtype(tf.clip_by_value(images, 0, 1), tf.uint8, saturate=True).numpy()


def sprite(thumbs):
    """uint8 [H, W, 3]: the thumbnails in a square grid, row-major (TensorBoard's sprite layout)."""
    n, side = len(thumbs), thumbs.shape[1]
    per_row = int(np.ceil(np.sqrt(n)))
    grid = np.zeros((per_row * side, per_row * side, 3), np.uint8)
    for i, thumb in enumerate(thumbs):
        r, c = divmod(i, per_row)
        grid[r * side:(r + 1) * side, c * side:(c + 1) * side] = thumb
    return grid


def _rgb(images):
    images = np.asarray(images)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def write_projector(out_dir, features, metadata, thumbs=None, tensor_name="backbone features", grid=None):
    """Writes features.tsv, metadata.tsv (columns: the keys of `metadata`, one row per feature row),
    sprite.png (with `thumbs`: uint8 [N, s, s, 3]), projector_config.pbtxt and an event file (with the
    neighbour `grid` as an image summary) into `out_dir`."""
    from tensorboard.plugins import projector

    os.makedirs(out_dir, exist_ok=True)
    np.savetxt(os.path.join(out_dir, "features.tsv"), features, delimiter="\t", fmt="%.6g")
    columns = list(metadata)
    with open(os.path.join(out_dir, "metadata.tsv"), "w", encoding="utf-8") as f:
        f.write("\t".join(columns) + "\n")
        for row in zip(*(metadata[c] for c in columns)):
            f.write("\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in row) + "\n")
    cfg = projector.ProjectorConfig()
    embedding = cfg.embeddings.add()
    embedding.tensor_name = tensor_name
    embedding.tensor_path = "features.tsv"
    embedding.metadata_path = "metadata.tsv"
    if thumbs is not None:
        tf.io.write_file(os.path.join(out_dir, "sprite.png"), tf.io.encode_png(sprite(thumbs)))
        embedding.sprite.image_path = "sprite.png"
        embedding.sprite.single_image_dim.extend([thumbs.shape[1], thumbs.shape[2]])
    projector.visualize_embeddings(out_dir, cfg)
    # TensorBoard lists a directory as a run (and looks for its projector config) when it holds events.
    writer = tf.summary.create_file_writer(out_dir)
    with writer.as_default():
        tf.summary.text("projector", f"{len(features)} points of {tensor_name}", step=0)
        if grid is not None:
            tf.summary.image("neighbours", grid[None], step=0)
    writer.close()


def restore_training_model(model_dir, checkpoint, source, label_plan):
    """The whole model of a training run (bank, pools, cluster ids, pseudo-label head) from a checkpoint."""
    from cmsf_tf import config
    from cmsf_tf.methods import METHODS
    from cmsf_tf.rundir import RunDir

    flags = RunDir(model_dir).flags()
    names = {s.name for s in config.TRAIN_SETTINGS}
    cfg = config.make(**{k: v for k, v in flags.items() if k in names})
    model = METHODS[cfg.method].from_run_config(cfg, sync_bn=False, num_images=source.num_train,
                                                num_classes=label_plan.num_classes)
    if not hasattr(model, "bank"):
        raise ValueError(f"{cfg.method} keeps no memory bank: it has no neighbours to show")
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
    return model, cfg


def bank_neighbours(model, images, indices, labels, true_labels, is_labelled, k):
    """The method's neighbour sets of training images (eval views [B, S, S, 3], their image indices,
    training labels, true labels, labelled flags): a dict of NumPy arrays with
      plain_rows [B, k]        bank rows of the unconstrained top-k of the target embedding
      constrained_rows [B, k]  the method's first (constrained) set, when it has a constraint
      *_images, *_sims          the rows' image indices and similarities to the query.
    Bank rows holding the query image itself are left out (its own earlier view is no news)."""
    targets = model.target_embedding(images, training=False)
    bank = tf.convert_to_tensor(model.bank.embeddings)
    bank_images = tf.convert_to_tensor(model.bank.image_indices)
    sims = ops.similarities(targets, bank)
    sims = tf.where(bank_images[None, :] == tf.cast(indices, tf.int64)[:, None], -3.0, sims)
    batch = {"weak": images, "index": tf.cast(indices, tf.int64), "label": tf.cast(labels, tf.int32),
             "true_label": tf.cast(true_labels, tf.int32), "is_labelled": tf.cast(is_labelled, tf.bool)}
    batch["query_label"] = model.query_labels(batch, targets)
    batch.update(model.step_embeddings(batch, targets))
    sets = [rows for _, rows in model.neighbour_sets(batch, targets, sims)]
    plain = ops.top_k_indices(sims, k)
    out = {"plain_rows": plain.numpy()}
    if len(sets) > 1:
        out["constrained_rows"] = sets[0].numpy()[:, :k]
    for name in [n for n in out]:
        kind = name.split("_")[0]
        out[f"{kind}_images"] = tf.gather(bank_images, out[name]).numpy()
        out[f"{kind}_sims"] = np.take_along_axis(sims.numpy(), out[name], axis=1)
    return out


def neighbour_grid(query_images, query_true, found, image_of, true_label_of, cell=None):
    """uint8 [H, W, 3]: one row per query — the query, then its plain neighbours, then (if any) the
    constrained ones, each framed green when its true label is the query's and red otherwise."""
    cell = cell or max(int(query_images.shape[1]), 32)
    pad, frame = 4, 2
    groups = [found["plain_images"]] + ([found["constrained_images"]] if "constrained_images" in found else [])
    k = groups[0].shape[1]
    step = cell + 2 * frame + 2  # what _paste advances per image
    width = pad + step * (1 + k * len(groups)) + pad * 3 * len(groups) + pad
    rows = []
    for q in range(len(query_images)):
        row = np.full((cell + 2 * pad, width, 3), 255, np.uint8)
        x = pad
        x = _paste(row, _thumb(query_images[q], cell), x, pad, (40, 40, 40), frame) + pad * 3
        for group in groups:
            for image_index in group[q]:
                label = true_label_of(image_index)
                colour = ((150, 150, 150) if label < 0 or query_true[q] < 0  # unlabelled: no verdict
                          else (30, 160, 60) if label == query_true[q] else (200, 40, 40))
                x = _paste(row, _thumb(image_of(image_index), cell), x, pad, colour, frame)
            x += pad * 3
        rows.append(row)
    return np.concatenate(rows, axis=0)


def _thumb(image01, cell):
    return thumbnails(image01[None], cell)[0]


def _paste(canvas, thumb, x, y, colour, frame):
    side = thumb.shape[0]
    canvas[y - frame:y + side + frame, x - frame:x + side + frame] = colour
    canvas[y:y + side, x:x + side] = thumb
    return x + side + frame * 2 + 2


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1)

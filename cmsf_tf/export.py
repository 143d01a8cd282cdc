"""Export a trained backbone: python -m cmsf_tf.export --model_dir=RUN --export_dir=DIR [--index=train]

DIR is a SavedModel (load it with tf.saved_model.load; no cmsf_tf needed) plus DIR/backbone.keras.

The SavedModel's root is a reusable, trainable network (the TF Hub convention):
  model(images, training=False)  float32 [B, S, S, 3] in [0, 1] -> float32 [B, F] backbone features
                                 (training=True: batch statistics, moving averages updated);
  model.variables / trainable_variables / regularization_losses.
Endpoints (the first three are also serving signatures):
  serve(images: uint8 [B, S, S, 3])   -> {"features": float32 [B, F], unit length}
  serve_jpeg(images: string [B])      -> {"features": ..., "ok": bool [B]}; encoded JPEG/PNG bytes, the
                                         evaluation transform (central 87.5% square, resized to S) inside the
                                         graph; items that are not images get zeros and ok = False
  encode(images: float32 [B, S, S, 3]) -> float32 [B, F] raw backbone features of normalised images
                                         (what python -m cmsf_tf.evaluate --saved_model uses)
  features / features_train(images: float32 in [0, 1]) -> [B, F]: the root call in inference / training
                                         mode, for keras.layers.TFSMLayer(call_endpoint="features",
                                         call_training_endpoint="features_train") to fine-tune it
With --index=train, a k-NN classifier over the training set's features (also signatures). With
--knn_search=exact (the default) it is stock TensorFlow: the features in a variable, searched exactly in
chunks of 65,536 rows, so tf.saved_model.load, saved_model_cli run and TF Serving serve it without
scann; with
--knn_search=approx it is ScaNN's tree + hashing searcher, and the process that loads it must
`import scann` first, for ScaNN's TensorFlow ops:
  neighbours(images: uint8)  -> {"ids": int64 [B, k] rows of the index, "similarities": float32 [B, k],
                                 "labels": int32 [B, k], "file_names": string [B, k] (when the data set
                                 names its images)}, most similar first
  classify(images: uint8)    -> {"label": int32 [B], "scores": float32 [B, classes]}: evaluate knn's vote
                                 (majority, ties to the smallest label, or --knn_vote=weighted) over the
                                 largest --knn_k neighbours
backbone.keras: the same network as a Keras model of built-in layers (Normalization, Conv2D,
BatchNormalization, ...): keras.saving.load_model(path) gives float [0, 1] images -> features.
Grey images: replicate the channel (serve) or pass them encoded (serve_jpeg handles it).
`assets/cmsf_export.json` records the run, checkpoint, step and encoder the export came from (and the index).
"""

import json
import os
import sys

from cmsf_tf import config

# Index rows the served exact search reads per matmul: a call holds B x SERVE_CHUNK float32 similarities
# (64 queries: 16 MB) however large the index.
SERVE_CHUNK = 65536


def portable_model(encoder):
    """keras.Model of built-in layers: float32 [B, S, S, 3] images in [0, 1] -> [B, F] backbone features
    (ImageNet normalisation as its first layer), with the weights of `encoder` (restored from a checkpoint)."""
    import keras
    import numpy as np

    from cmsf_tf.data import augment
    from cmsf_tf.models import backbones

    info, size = encoder.info, encoder.image_size
    network = backbones.build_backbone(info["arch"], size, 3, info["width"], name="resnet", portable=True)
    network.set_weights(encoder.backbone.get_weights())  # same layers in the same order: same weight list
    images = keras.Input((size, size, 3), name="images")
    normalised = keras.layers.Normalization(mean=augment.IMAGENET_MEAN, variance=np.square(augment.IMAGENET_STD),
                                            name="imagenet_normalization")(images)
    return keras.Model(images, network(normalised), name="cmsf_backbone"), network


class IndexData:
    """The training-set side of the served k-NN classifier: unit features, labels, optional names."""

    def __init__(self, features, labels, names, num_classes, k, vote, temperature, search, subset, dtype="float32"):
        self.features, self.labels, self.names = features, labels, names
        self.num_classes, self.k, self.vote, self.temperature = num_classes, k, vote, temperature
        self.search, self.subset, self.dtype = search, subset, dtype


def index_data(encoder, knn_cfg, log=print, dtype="float32"):
    """IndexData of the training split (or its labelled part) for evaluate knn's settings in `knn_cfg`,
    its features to be served in `dtype`."""
    import numpy as np

    from cmsf_tf.data import pipeline
    from cmsf_tf.eval import knn
    from cmsf_tf.eval.context import EvalContext
    from cmsf_tf.eval.protocols import knn as knn_protocol

    ctx = EvalContext(knn_cfg, encoder, log)
    dataset = ctx.dataset
    # The images evaluate knn indexes: the training split (or its labelled part); for unlabelled training
    # images the labelled val/ half, since a served vote over label-less images would name no class.
    source, keep, subset, _ = knn_protocol.index_source(ctx)
    log(f"extracting the index: {subset} training images of {dataset} ...")
    names = []
    feats, labels = knn.features_and_labels(
        encoder.features, pipeline.eval_split(source, "train", encoder.image_size, knn_cfg.eval_batch_size, keep,
                                              with_names=True), names=names)
    if not len(feats):
        raise config.UsageError(f"the index would be empty: no {subset} training images in {dataset}")
    k = max(knn_cfg.knn_k)
    if k > len(feats):
        raise config.UsageError(f"--knn_k {k} is larger than the index ({len(feats)} images)")
    # Array data sets name an image by its position: the ids say as much, so no names are stored.
    named = any(n != str(i) for i, n in enumerate(names))
    return IndexData(feats, labels, np.array(names, dtype=object) if named else None, source.num_classes, k,
                     knn_cfg.knn_vote, knn_cfg.knn_temperature, knn_cfg.knn_search, subset, dtype)


def _scann_state(index):
    """ScaNN's TensorFlow searcher over the index rows (dot product), as a module of variables."""
    import scann

    from cmsf_tf.eval import knn

    builder = scann.scann_ops.builder(index.features, index.k, "dot_product")
    return knn.configure_builder(builder, len(index.features), index.k, index.search).build().serialize_to_module()


def vote_scores(neighbour_labels, similarities, num_classes, vote="majority", temperature=0.07):
    """float32 [B, classes] class scores of k neighbours (TF; eval.knn.vote_counts / weighted_vote_counts)."""
    import tensorflow as tf

    one_hot = tf.one_hot(neighbour_labels, num_classes, dtype=tf.float32)
    weights = tf.ones_like(similarities) if vote == "majority" else tf.exp(similarities / temperature)
    return tf.einsum("bkc,bk->bc", one_hot, weights)


def first_argmax(scores):
    """int32 [B]: the smallest class among each row's maxima (evaluate knn's tie rule; tf.argmax does
    not promise which of tied maxima it returns)."""
    import tensorflow as tf

    classes = tf.range(tf.shape(scores)[1])
    is_max = scores >= tf.reduce_max(scores, axis=1, keepdims=True)
    return tf.reduce_min(tf.where(is_max, classes[None], tf.shape(scores)[1]), axis=1)


def write_saved_model(encoder, export_dir, index=None):
    """Writes `encoder` (eval.encoder.Encoder restored from a checkpoint) as a SavedModel and a .keras
    file into `export_dir`; `index` (IndexData) adds the served k-NN classifier."""
    import tensorflow as tf

    from cmsf_tf import ops
    from cmsf_tf.data import augment

    size = encoder.image_size
    model, network = portable_model(encoder)
    image_spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    uint8_spec = tf.TensorSpec([None, size, size, 3], tf.uint8)

    def guarded(fn, images):
        # An empty batch answers with an empty result (BatchNorm fails on a 0-row batch).
        return tf.cond(tf.shape(images)[0] > 0, lambda: tf.cast(fn(images), tf.float32),
                       lambda: tf.zeros([0, encoder.feature_dim], tf.float32))

    def unit(normalised):
        return tf.math.l2_normalize(guarded(lambda x: network(x, training=False), normalised), axis=-1)

    def unit_uint8(images):
        return unit(augment.normalize(tf.image.convert_image_dtype(images, tf.float32)))

    root = tf.__internal__.tracking.AutoTrackable()
    root.model = model
    # The reusable-SavedModel attributes (TF Hub's convention) that a wrapping layer reads.
    root.variables = list(model.variables)
    root.trainable_variables = list(model.trainable_variables)
    root.regularization_losses = []
    # The tf.Variables under the Keras variables, tracked as themselves: TensorFlow's TF1 session loader
    # (saved_model_cli run, TF Serving's C++ loader) restores only plain tf.Variables it reaches in the
    # object graph, and without these fails on the first BatchNorm statistic ("Could not find variable
    # bn1/moving_mean"); tf.saved_model.load reads them either way.
    root.graph_variables = [v.value for v in model.variables]

    @tf.function
    def call(images, training=False):
        return model(images, training=training)

    for training in (False, True):
        call.get_concrete_function(image_spec, training=training)
    root.__call__ = call
    root.features = tf.function(lambda images: guarded(lambda x: model(x, training=False), images),
                                input_signature=[image_spec])
    root.features_train = tf.function(lambda images: model(images, training=True), input_signature=[image_spec])
    root.serve = tf.function(lambda images: {"features": unit_uint8(images)}, input_signature=[uint8_spec])

    def serve_jpeg(images):
        # Item by item: an item that is not a JPEG/PNG/GIF/BMP (or is empty) gets zero features and
        # ok = False instead of failing the whole batch; an empty batch gives empty outputs.
        ok = tf.map_fn(augment.looks_like_image, images, fn_output_signature=tf.bool)
        blank = tf.zeros([size, size, 3], tf.float32)
        views = tf.map_fn(lambda item: tf.cond(item[1], lambda: augment.eval_view(item[0], size), lambda: blank),
                          (images, ok), fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        features = unit(views)  # eval_view normalises
        return {"features": tf.where(ok[:, None], features, tf.zeros_like(features)), "ok": ok}

    root.serve_jpeg = tf.function(serve_jpeg, input_signature=[tf.TensorSpec([None], tf.string)])
    root.encode = tf.function(lambda images: guarded(lambda x: network(x, training=False), images),
                              input_signature=[image_spec])
    signatures = {"serving_default": root.serve, "serve": root.serve, "serve_jpeg": root.serve_jpeg,
                  "encode": root.encode}

    if index is not None:
        # Labels and names are variables, not graph constants: a 1.28M-row index must not bloat the graph.
        root.index_labels = tf.Variable(index.labels, trainable=False, name="index_labels")
        if index.names is not None:
            root.index_names = tf.Variable(index.names.astype(bytes), trainable=False, name="index_names")
        k, classes = index.k, index.num_classes
        if index.search == "exact":
            # Stock TensorFlow ops over the features held in a variable: no custom ops to register where it
            # is loaded, nothing built per call, and the index read in chunks
            # so that a call's memory is B x SERVE_CHUNK similarities whatever the index size.
            root.index_features = tf.Variable(tf.cast(index.features, index.dtype), trainable=False,
                                              name="index_features")

            def search(queries):
                sims, ids = ops.chunked_top_k(queries, root.index_features, k, chunk=SERVE_CHUNK)
                return ids, sims
        else:
            import scann  # noqa: F401  (ScaNN's TF ops must be registered to build and save the searcher)
            from scann.scann_ops.py import scann_ops

            root.index = _scann_state(index)

            def search(queries):
                # The searcher is rebuilt from its saved state per call (ScaNN's TF ops have no persistent
                # handle in a SavedModel): the approximate flavour needs `import scann` where it is loaded.
                searcher = scann_ops.searcher_from_module(root.index)
                ids, sims = searcher.search_batched(queries, final_num_neighbors=k)
                return tf.cast(ids, tf.int64), sims

        def neighbours(images):
            ids, sims = search(unit_uint8(images))
            ids = tf.ensure_shape(ids, [None, k])
            out = {"ids": ids, "similarities": tf.ensure_shape(sims, [None, k]),
                   "labels": tf.gather(root.index_labels, ids)}
            if index.names is not None:
                out["file_names"] = tf.gather(root.index_names, ids)
            return out

        def classify(images):
            found = neighbours(images)
            scores = vote_scores(found["labels"], found["similarities"], classes, index.vote, index.temperature)
            return {"label": first_argmax(scores), "scores": scores}

        root.neighbours = tf.function(neighbours, input_signature=[uint8_spec])
        root.classify = tf.function(classify, input_signature=[uint8_spec])
        signatures.update(neighbours=root.neighbours, classify=root.classify)

    tf.saved_model.save(root, export_dir, signatures={name: fn.get_concrete_function()
                                                      for name, fn in signatures.items()})
    model.save(os.path.join(export_dir, "backbone.keras"))
    meta = {**encoder.info, "image_size": size, "feature_dim": encoder.feature_dim,
            "inputs": "root call, features, features_train, backbone.keras: float32 images in [0, 1]; "
                      "serve, neighbours, classify: uint8; encode: ImageNet-normalised float32"}
    if index is not None:
        meta["index"] = {"size": int(len(index.features)), "k": index.k, "vote": index.vote,
                         "temperature": index.temperature, "search": index.search, "dtype": index.dtype,
                         "subset": index.subset,
                         "num_classes": index.num_classes, "file_names": index.names is not None}
    os.makedirs(os.path.join(export_dir, "assets"), exist_ok=True)
    with open(os.path.join(export_dir, "assets", "cmsf_export.json"), "w") as f:
        json.dump(meta, f, indent=2)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}; flags look like --name=value", file=sys.stderr)
        sys.exit(2)
    from cmsf_tf.eval import encoder as encoders

    cfg = config.export_from_flags()
    enc = encoders.from_checkpoint(cfg.model_dir, cfg.checkpoint or None, cfg.encoder)
    if os.path.exists(cfg.export_dir) and os.listdir(cfg.export_dir):
        raise config.UsageError(f"--export_dir {cfg.export_dir} exists and is not empty")
    index = index_data(enc, cfg.knn, lambda m: print(m, file=sys.stderr, flush=True),
                       cfg.index_dtype) if cfg.index else None
    write_saved_model(enc, cfg.export_dir, index)
    served = f", with a {len(index.features)}-image k-NN index" if cfg.index else ""
    print(f"exported the {cfg.encoder} backbone of {enc.info['path']} (step {enc.info['step']}) to "
          f"{cfg.export_dir}{served}")


def cli():
    """The `cmsf-export` console script: `python -m cmsf_tf.export`."""
    config.run_entry_point(main, "export")


if __name__ == "__main__":
    cli()

"""Export a trained backbone as a SavedModel: python -m cmsf_tf.export --model_dir=RUN --export_dir=DIR

Endpoints (also serving signatures):
  serve(images: uint8 [B, S, S, 3])   -> {"features": float32 [B, F], unit length}
  serve_jpeg(images: string [B])      -> {"features": ..., "ok": bool [B]}; encoded JPEG/PNG bytes, the
                                         evaluation transform (central 87.5% square, resized to S) inside the
                                         graph; items that are not images get zeros and ok = False
  encode(images: float32 [B, S, S, 3]) -> float32 [B, F] raw backbone features of normalised images
                                         (what python -m cmsf_tf.evaluate --saved_model uses)
Grey images: replicate the channel (serve) or pass them encoded (serve_jpeg handles it).
`assets/cmsf_export.json` records the run, checkpoint, step and encoder the export came from.
"""

import json
import os
import sys

from absl import app

from cmsf_tf import config


def write_saved_model(encoder, export_dir):
    """Writes `encoder` (eval.encoder.Encoder restored from a checkpoint) as a SavedModel."""
    import keras
    import tensorflow as tf

    from cmsf_tf.data import augment

    size = encoder.image_size
    backbone = encoder.backbone

    def raw_features(images):
        # An empty batch answers with an empty result (the backbone's BatchNorm fails on a 0-row batch).
        return tf.cond(tf.shape(images)[0] > 0, lambda: tf.cast(backbone(images, training=False), tf.float32),
                       lambda: tf.zeros([0, encoder.feature_dim], tf.float32))

    def unit_features(images):
        return {"features": tf.math.l2_normalize(raw_features(images), axis=-1)}

    def serve(images):
        return unit_features(augment.normalize(tf.image.convert_image_dtype(images, tf.float32)))

    def serve_jpeg(images):
        # Item by item: an item that is not a JPEG/PNG/GIF/BMP (or is empty) gets zero features and
        # ok = False instead of failing the whole batch; an empty batch gives empty outputs.
        ok = tf.map_fn(augment.looks_like_image, images, fn_output_signature=tf.bool)
        blank = tf.zeros([size, size, 3], tf.float32)
        views = tf.map_fn(lambda item: tf.cond(item[1], lambda: augment.eval_view(item[0], size), lambda: blank),
                          (images, ok), fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        features = unit_features(views)["features"]
        return {"features": tf.where(ok[:, None], features, tf.zeros_like(features)), "ok": ok}

    archive = keras.export.ExportArchive()
    archive.track(backbone)
    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    archive.add_endpoint("serve_jpeg", serve_jpeg, input_signature=[tf.TensorSpec([None], tf.string)])
    archive.add_endpoint("encode", raw_features,
                         input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    archive.write_out(export_dir, verbose=False)
    os.makedirs(os.path.join(export_dir, "assets"), exist_ok=True)
    with open(os.path.join(export_dir, "assets", "cmsf_export.json"), "w") as f:
        json.dump({**encoder.info, "image_size": size, "feature_dim": encoder.feature_dim}, f, indent=2)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}; flags look like --name=value", file=sys.stderr)
        sys.exit(2)
    from cmsf_tf.eval import encoder as encoders

    try:
        cfg = config.export_from_flags()
        enc = encoders.from_checkpoint(cfg.model_dir, cfg.checkpoint or None, cfg.encoder)
        if os.path.exists(cfg.export_dir) and os.listdir(cfg.export_dir):
            raise config.UsageError(f"--export_dir {cfg.export_dir} exists and is not empty")
        write_saved_model(enc, cfg.export_dir)
    except (config.UsageError, encoders.EncoderError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported the {cfg.encoder} backbone of {enc.info['path']} (step {enc.info['step']}) to {cfg.export_dir}")


def cli():
    """The `cmsf-export` console script: `python -m cmsf_tf.export`."""
    config.define_flags()
    config.quiet_tensorflow()
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # SavedModel writing logs every asset and shard at INFO
    app.run(main)


if __name__ == "__main__":
    cli()

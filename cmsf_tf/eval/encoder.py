"""The network under evaluation: a backbone restored from a training checkpoint, or an exported SavedModel.

Only the backbone is restored (a surrogate `tf.train.Checkpoint(model=Checkpoint(online_backbone=...))`
matches it by its path in the checkpoint's object graph), so evaluating a CMSF-2Q run on ImageNet does not
allocate its bank and per-image pools. Every protocol sees the same thing: `features(images)` maps
normalised eval-view images [B, S, S, 3] to float32 [B, F] backbone features (before projection).
"""

import dataclasses
import json
import os

import tensorflow as tf

from cmsf_tf.errors import UserError
from cmsf_tf.models import backbones
from cmsf_tf.rundir import RunDir

# Where a training run's backbones sit in its checkpoint.
_BACKBONES = {"online": "online_backbone", "target": "target_backbone"}
# What evaluation takes from the training run by default: its data and labelled subset.
_RUN_DATA = ("dataset", "data_dir", "class_list", "label_split", "seed")


class EncoderError(UserError):
    """A checkpoint or SavedModel that cannot be evaluated, said in one sentence."""


class NotARunError(EncoderError):
    """A --model_dir without the flags.json of a training run (callers that also take an export add so)."""


@dataclasses.dataclass
class Encoder:
    features: object  # callable: float32 [B, S, S, 3] normalised images -> float32 [B, F]
    image_size: int
    feature_dim: int
    info: dict  # where it came from: kind, path, step, encoder, arch, width
    backbone: object = None  # the keras.Model when restored from a checkpoint (fine-tuning needs it)


def run_flags(model_dir):
    """The flags.json of a training run."""
    flags = RunDir(model_dir).flags()
    if flags is None:
        raise NotARunError(f"{model_dir} is not a training run (no flags.json); pass the --model_dir a "
                           "training wrote")
    return flags


def latest_checkpoint(model_dir):
    checkpoints = RunDir(model_dir).checkpoints
    path = tf.train.latest_checkpoint(checkpoints)
    if path is None:
        raise EncoderError(f"{model_dir} has no checkpoint in {checkpoints}")
    return path


def checkpoint_step(path):
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
        if name.startswith("model/train_steps/"):
            return int(reader.get_tensor(name))
    return None


def describe_checkpoint(path, which="online"):
    """"resnet18_small, width 16" — the backbone a checkpoint holds, read from its variable shapes."""
    reader = tf.train.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    # Each backbone's kernels are stored under one of its paths; the target's (EMA) path holds them all,
    # and the online one may sit under the optimizer, so look at whichever backbone is complete.
    for prefix in (f"model/{_BACKBONES[which]}/", "model/target_backbone/", "model/online_backbone/"):
        kernels = sorted(((int(n.split("/")[3]), s) for n, s in shapes.items()
                          if n.startswith(prefix) and "/_kernel/" in n and len(s) == 4))
        if kernels:
            break
    else:
        return "no ResNet backbone"
    stem = kernels[0][1]
    width = stem[3]
    for arch, (_, _, small_stem) in backbones.ARCHS.items():
        if _conv_count(arch) == len(kernels) and (stem[0] == 3) == small_stem:
            return f"{arch}, width {width}"
    return f"an unknown network of {len(kernels)} convolutions, first {stem[0]}x{stem[1]} with {width} channels"


def _conv_count(arch):
    """Convolutions of a ResNet: stem, 2 or 3 per block, a projection where a stage changes shape
    (every bottleneck stage; basic-block stages after the first)."""
    kind, blocks, _ = backbones.ARCHS[arch]
    per_block = 3 if kind == "bottleneck" else 2
    return 1 + per_block * sum(blocks) + len(blocks) - (0 if kind == "bottleneck" else 1)


def from_checkpoint(model_dir, checkpoint=None, which="online"):
    """The online (or EMA target) backbone of a training run's checkpoint (default: the newest)."""
    flags = run_flags(model_dir)
    path = checkpoint or latest_checkpoint(model_dir)
    if not tf.io.gfile.exists(path + ".index"):
        raise EncoderError(f"checkpoint {path} does not exist")
    backbone = backbones.build_backbone(flags["arch"], flags["image_size"], 3, flags["width"], False,
                                        _BACKBONES[which])
    ckpt = tf.train.Checkpoint(model=tf.train.Checkpoint(**{_BACKBONES[which]: backbone}))
    try:
        ckpt.restore(path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError):
        raise EncoderError(
            f"checkpoint {path} holds a {describe_checkpoint(path, which)} backbone, not the "
            f"{flags['arch']}, width {flags['width']} of {model_dir}/flags.json") from None
    return Encoder(features=tf.function(lambda x: backbone(x, training=False)), image_size=int(flags["image_size"]),
                   feature_dim=backbones.feature_dim(flags["arch"], flags["width"]), backbone=backbone,
                   info={"kind": "checkpoint", "path": path, "step": checkpoint_step(path), "encoder": which,
                         "method": flags.get("method"), "arch": flags["arch"], "width": flags["width"],
                         "run": {k: flags.get(k) for k in _RUN_DATA}})


def from_saved_model(path):
    """An exported SavedModel (cmsf_tf.export): its `encode` endpoint takes normalised images."""
    if not tf.saved_model.contains_saved_model(path):
        raise EncoderError(f"{path} is not a SavedModel directory")
    loaded = tf.saved_model.load(path)
    if not hasattr(loaded, "encode"):
        raise EncoderError(f"SavedModel {path} has no 'encode' endpoint; export it with python -m cmsf_tf.export")
    meta_path = os.path.join(path, "assets", "cmsf_export.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    spec = loaded.encode.concrete_functions[0].structured_input_signature[0][0]
    image_size = int(spec.shape[1])
    dim = int(loaded.encode(tf.zeros([1, image_size, image_size, 3])).shape[-1])
    return Encoder(features=lambda x: loaded.encode(x), image_size=image_size, feature_dim=dim,
                   info={**meta, "kind": "saved_model", "path": path, "exported_from": meta.get("path")})


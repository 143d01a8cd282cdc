"""Weights across PyTorch and TensorFlow: python -m cmsf_tf.convert from_torch|to_torch [--flags].

  from_torch --checkpoint=FILE.pth|FILE.safetensors --arch=... [--width=N] [--image_size=N] --model_dir=DIR
      [any train flag, e.g. --flagfile=flags/x.cfg]
    A torchvision ResNet state dict (bare, or under 'state_dict' / 'model'), the authors' MSF/CMSF training
    checkpoint (encoder_q / encoder_t with the projector at fc., predict_q; DDP- or DataParallel-wrapped)
    or solo-learn's (backbone., momentum_backbone., projector., ...) becomes a cmsf_tf run directory:
    flags.json and checkpoints/ckpt-0 holding the parts it had. `evaluate` and `export` read it as any run;
    `train` in it (same flags) or `train --init_from=DIR` elsewhere starts a run from those weights.
  to_torch --model_dir=DIR [--checkpoint=PREFIX] [--encoder=online|target] --output=FILE.pth|FILE.safetensors
    The backbone as a torchvision-layout state dict: torchvision.models.resnet50().load_state_dict(sd,
    strict=False) misses only fc.weight and fc.bias.

Weights are matched by name, torchvision's names being the Keras layers' own (models/backbones.py), never
by the order layers were created in. Anything missing, unexpected or of the wrong shape is one sentence and
exit 2, with nothing written.
"""

import json
import os
import sys

import numpy as np
from absl import flags

from cmsf_tf import config, weights_io
from cmsf_tf.errors import UserError
from cmsf_tf.rundir import RunDir

# The parts of a mean-shift model a checkpoint may carry, as the model (methods/base.py) names them.
PARTS = ("online_backbone", "target_backbone", "online_projector", "target_projector", "predictor")


class ConvertError(UserError):
    """Weights that do not fit, said in one sentence."""


# ----- torchvision names <-> Keras variables -----
def _to_keras(array, kind):
    if kind == "conv":  # torch [out, in, h, w] -> Keras [h, w, in, out]
        return np.transpose(array, (2, 3, 1, 0))
    if kind == "linear":  # torch [out, in] -> Keras [in, out]
        return np.transpose(array)
    return array


def _to_torch(array, kind):
    if kind == "conv":
        return np.transpose(array, (3, 2, 0, 1))
    if kind == "linear":
        return np.transpose(array)
    return array


def _bn_slots(prefix, layer):
    return {f"{prefix}weight": (layer.gamma, "vector"), f"{prefix}bias": (layer.beta, "vector"),
            f"{prefix}running_mean": (layer.moving_mean, "vector"),
            f"{prefix}running_var": (layer.moving_variance, "vector")}


def backbone_slots(backbone):
    """{torchvision name: (Keras variable, kind)} of a backbone (models/backbones.py names its layers so)."""
    import keras

    slots = {}
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Conv2D):
            slots[f"{layer.name}.weight"] = (layer.kernel, "conv")
        elif isinstance(layer, keras.layers.BatchNormalization):
            slots.update(_bn_slots(f"{layer.name}.", layer))
    return slots


def mlp_slots(mlp):
    """{name: (variable, kind)} of a Linear-BN-ReLU-Linear head (models/heads.py) under PyTorch's
    nn.Sequential numbering: 0 (Linear), 1 (BatchNorm1d), 3 (Linear)."""
    import keras

    kinds = [type(layer) for layer in mlp.layers if not isinstance(layer, keras.layers.InputLayer)]
    layers = [layer for layer in mlp.layers if not isinstance(layer, keras.layers.InputLayer)]
    if len(layers) != 4 or not (isinstance(layers[0], keras.layers.Dense) and isinstance(layers[3], keras.layers.Dense)
                                and isinstance(layers[1], keras.layers.BatchNormalization)):
        raise ConvertError(f"{mlp.name} is not a Linear-BN-ReLU-Linear head ({[k.__name__ for k in kinds]})")
    slots = {"0.weight": (layers[0].kernel, "linear"), "0.bias": (layers[0].bias, "vector"),
             "3.weight": (layers[3].kernel, "linear"), "3.bias": (layers[3].bias, "vector")}
    slots.update(_bn_slots("1.", layers[1]))
    return slots


def _slots(part, network):
    return backbone_slots(network) if part.endswith("backbone") else mlp_slots(network)


def _shape(shape):
    return "x".join(str(d) for d in shape) or "a scalar"


def assign_part(network, part, state, source, what):
    """Loads a part's torch-named state dict into a Keras network, all or nothing: every tensor must be
    there with its shape, nothing else may be (BatchNorm's num_batches_tracked aside)."""
    slots = _slots(part, network)
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    unexpected = sorted(set(given) - set(slots))
    if unexpected:
        raise ConvertError(f"{source} holds {part.replace('_', ' ')} tensor {unexpected[0]!r}, which {what} does "
                           f"not have")
    missing = [name for name in slots if name not in given]
    if missing:
        raise ConvertError(f"{source} has no {part.replace('_', ' ')} tensor {missing[0]!r}, which {what} needs")
    values = []
    for name, (variable, kind) in slots.items():
        value = _to_keras(np.asarray(given[name], np.float32), kind)
        if tuple(value.shape) != tuple(variable.shape):
            want = _to_torch(np.zeros(variable.shape, np.float32), kind).shape
            raise ConvertError(f"{part.replace('_', ' ')} tensor {name!r} is {_shape(given[name].shape)} in "
                               f"{source}, but {what} needs {_shape(want)}")
        values.append((variable, value))
    for variable, value in values:
        variable.assign(value)


def torch_state_dict(network, part="online_backbone", batches_tracked=0):
    """{torch name: NumPy array} of a Keras backbone or head; BatchNorm layers also get num_batches_tracked
    (int64), which torchvision's state dicts hold."""
    out = {}
    for name, (variable, kind) in _slots(part, network).items():
        out[name] = np.ascontiguousarray(_to_torch(np.asarray(variable.numpy(), np.float32), kind))
        if name.endswith("running_var"):
            out[name[:-len("running_var")] + "num_batches_tracked"] = np.array(batches_tracked, np.int64)
    return out


# ----- what a torch state dict holds -----
def describe_torch_backbone(state):
    """(arch, width) of a torchvision-named ResNet state dict, or None when it is not one."""
    from cmsf_tf.models import backbones

    stem = state.get("conv1.weight")
    if stem is None or np.ndim(stem) != 4:
        return None
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{s}.")}) for s in range(1, 5))
    kind = "bottleneck" if any(".conv3." in k for k in state) else "basic"
    for arch, (arch_kind, arch_blocks, small_stem) in backbones.ARCHS.items():
        if (arch_kind, arch_blocks, small_stem) == (kind, blocks, np.shape(stem)[2] == 3):
            return arch, int(np.shape(stem)[0])
    return f"ResNet with {kind} blocks {blocks} and a {np.shape(stem)[2]}x{np.shape(stem)[3]} stem", int(
        np.shape(stem)[0])


# ----- checkpoints of cmsf_tf -----
def checkpoint_parts(path):
    """Names of the parts of the model stored in a cmsf_tf checkpoint (read from its object graph: the
    variables' own keys may sit under another path, e.g. the optimizer's)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(tf.train.load_checkpoint(path).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    model = [c.node_id for c in graph.nodes[0].children if c.local_name == "model"]
    return {c.local_name for c in graph.nodes[model[0]].children} if model else set()


def resolve_checkpoint(path):
    """A checkpoint prefix from a run directory (its newest checkpoint) or a prefix."""
    import tensorflow as tf

    if os.path.isdir(path):
        checkpoints = RunDir(path).checkpoints
        found = tf.train.latest_checkpoint(checkpoints)
        if found is None:
            raise ConvertError(f"{path} holds no checkpoint (nothing in {checkpoints})")
        return found
    if path.endswith((".pth", ".pt", ".safetensors")):
        raise ConvertError(f"{path} is a PyTorch file; convert it first: python -m cmsf_tf.convert from_torch "
                           f"--checkpoint={path} --arch=... --model_dir=DIR, then use DIR")
    if not tf.io.gfile.exists(path + ".index"):
        raise ConvertError(f"{path} is neither a run directory nor a checkpoint prefix (no {path}.index)")
    return path


def init_model(model, path, log=print):
    """Starts a new run's model from the weights in checkpoint `path` (a prefix, or a run directory: its
    newest): each part of PARTS the model and the checkpoint both have is restored; a model whose target
    parts the checkpoint lacks gets copies of the restored online ones (as a new run's target starts).
    Returns (restored parts, new parts)."""
    import tensorflow as tf

    from cmsf_tf.eval import encoder

    path = resolve_checkpoint(path)
    stored = checkpoint_parts(path)
    wanted = [part for part in PARTS if hasattr(model, part)]
    restored = [part for part in wanted if part in stored]
    if "online_backbone" not in restored:
        raise ConvertError(f"{path} holds no online backbone to start from")
    for part in restored:
        try:
            tf.train.Checkpoint(model=tf.train.Checkpoint(**{part: getattr(model, part)})).restore(
                path).expect_partial().assert_existing_objects_matched()
        except (AssertionError, ValueError):
            if part.endswith("backbone"):
                holds = encoder.describe_checkpoint(path, part.split("_")[0])
                raise ConvertError(f"{path} holds a {holds} backbone, not this run's (--arch, --width)") from None
            raise ConvertError(f"{path}'s {part.replace('_', ' ')} has other shapes than this run's "
                               "(--proj_hidden, --proj_dim)") from None
    if hasattr(model, "_copy_online_to_target") and not {"target_backbone", "target_projector"} <= set(restored):
        model._copy_online_to_target()
        log("the EMA target starts as a copy of the online network (the checkpoint has no target of its own)")
    fresh = [part for part in wanted if part not in restored]
    log(f"initialised from {path}: {', '.join(p.replace('_', ' ') for p in restored)}"
        + (f"; new: {', '.join(p.replace('_', ' ') for p in fresh)}" if fresh else ""))
    return restored, fresh


def imported_checkpoint(model_dir):
    """The checkpoint a converted run directory holds (written by from_torch), or None."""
    run = RunDir(model_dir)
    if not os.path.isfile(run.imported_path):
        return None
    with open(run.imported_path) as f:
        return run.checkpoint(json.load(f)["checkpoint"])


# ----- the commands -----
def from_torch(cfg, checkpoint, log=print):
    """Converts a PyTorch checkpoint into the run directory cfg.model_dir; returns the imported.json dict."""
    state = weights_io.read_state_dict(checkpoint)
    layout, parts, ignored = weights_io.split_parts(state, checkpoint)
    if "online_backbone" not in parts:
        raise ConvertError(f"{checkpoint} ({layout} layout) holds no backbone")
    found = describe_torch_backbone(parts["online_backbone"])
    if found is None:
        raise ConvertError(f"{checkpoint}'s backbone is not a ResNet (no conv1.weight)")
    if found != (cfg.arch, cfg.width):
        raise ConvertError(f"{checkpoint} holds a {found[0]} of width {found[1]}, not the {cfg.arch} of width "
                           f"{cfg.width} asked for (--arch, --width)")
    run = RunDir(cfg.model_dir)
    checkpoints = run.checkpoints
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise ConvertError(f"--model_dir {cfg.model_dir} already holds checkpoints; convert into a new directory")

    import keras
    import tensorflow as tf

    from cmsf_tf.models import backbones, heads

    keras.utils.set_random_seed(cfg.seed)
    feat = backbones.feature_dim(cfg.arch, cfg.width)
    hidden, dim = heads.head_dims(feat, cfg.proj_hidden, cfg.proj_dim)
    what = {"online_backbone": f"a {cfg.arch} of width {cfg.width}", "target_backbone": f"a {cfg.arch} of width "
            f"{cfg.width}", "online_projector": f"a {feat}-{hidden}-{dim} projector (--proj_hidden, --proj_dim)",
            "target_projector": f"a {feat}-{hidden}-{dim} projector (--proj_hidden, --proj_dim)",
            "predictor": f"a {dim}-{hidden}-{dim} predictor (--proj_hidden, --proj_dim)"}

    def network(part):  # as the model (methods/base.py) builds it, under its name there
        if part.endswith("backbone"):
            return backbones.build_backbone(cfg.arch, cfg.image_size, 3, cfg.width, False, part)
        return heads.mlp(dim if part == "predictor" else feat, hidden, dim, False, part)

    networks = {}
    for part in PARTS:
        if part in parts:
            networks[part] = network(part)
            assign_part(networks[part], part, parts[part], checkpoint, what[part])
    # A target the checkpoint lacks is a copy of the online part, as a new run's target starts.
    for online, target in (("online_backbone", "target_backbone"), ("online_projector", "target_projector")):
        if online in networks and target not in networks:
            networks[target] = network(target)
            for t, o in zip(networks[target].weights, networks[online].weights):
                t.assign(o)

    from cmsf_tf import train

    train.prepare_model_dir(cfg)  # after every check: nothing is written for weights that do not fit
    step = tf.Variable(0, dtype=tf.int64, name="train_steps")
    saved = tf.train.CheckpointManager(tf.train.Checkpoint(model=tf.train.Checkpoint(train_steps=step, **networks)),
                                       checkpoints, max_to_keep=1).save(checkpoint_number=0)
    info = {"source": os.path.abspath(checkpoint), "layout": layout, "checkpoint": os.path.basename(saved),
            "imported": sorted(p for p in parts if p in PARTS),
            "copied": sorted(p for p in networks if p not in parts),
            "new": sorted(p for p in PARTS if p not in networks), "ignored": len(ignored)}
    with open(run.imported_path, "w") as f:
        json.dump(info, f, indent=2)
    log(f"converted {checkpoint} ({layout} layout, {cfg.arch} width {cfg.width}) into {saved}")
    log(f"  imported: {', '.join(p.replace('_', ' ') for p in info['imported'])}")
    if info["copied"]:
        log(f"  copied from the online network: {', '.join(p.replace('_', ' ') for p in info['copied'])}")
    if info["new"]:
        log(f"  not in the checkpoint (a run trained from here initialises them as a new run's): "
            f"{', '.join(p.replace('_', ' ') for p in info['new'])}")
    if ignored:
        log(f"  ignored {len(ignored)} other tensors ({', '.join(ignored[:4])}{', ...' if len(ignored) > 4 else ''})")
    return info


def to_torch(model_dir, checkpoint, which, output, log=print):
    from cmsf_tf.eval import encoder

    if not output.endswith((".pth", ".pt", ".safetensors")):
        raise ConvertError(f"--output {output!r} must end in .pth, .pt or .safetensors")
    enc = encoder.from_checkpoint(model_dir, checkpoint or None, which)
    state = torch_state_dict(enc.backbone, batches_tracked=enc.info.get("step") or 0)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if output.endswith(".safetensors"):
        weights_io.write_safetensors(output, state, {"format": "pt", "arch": enc.info["arch"],
                                                      "width": enc.info["width"], "source": enc.info["path"]})
    else:
        weights_io.write_pth(output, state)
    log(f"wrote the {which} backbone of {enc.info['path']} (step {enc.info['step']}; {enc.info['arch']}, width "
        f"{enc.info['width']}) as {len(state)} torchvision-named tensors to {output}")
    return state


COMMANDS = ("from_torch", "to_torch")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        print(f"error: give one command, {' or '.join(COMMANDS)} (got {' '.join(argv[1:]) or 'none'})",
              file=sys.stderr)
        sys.exit(2)
    FLAGS = flags.FLAGS
    if argv[1] == "from_torch":
        if not FLAGS.checkpoint:
            raise config.UsageError("from_torch needs --checkpoint=FILE.pth or FILE.safetensors")
        cfg = config.from_flags()
        from_torch(cfg, FLAGS.checkpoint)
    else:
        if not FLAGS.output:
            raise config.UsageError("to_torch needs --output=FILE.pth or FILE.safetensors")
        to_torch(FLAGS.model_dir, FLAGS.checkpoint, FLAGS.encoder, FLAGS.output)


def cli():
    """The `cmsf-convert` console script: `python -m cmsf_tf.convert`."""
    config.run_entry_point(main, "convert")


if __name__ == "__main__":
    cli()

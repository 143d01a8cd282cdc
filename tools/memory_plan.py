"""Memory plan: the bytes per replica of a recipe's training state, from the model's own variables.

    python tools/memory_plan.py --flagfile=flags/cmsf_2q.cfg --replicas=8 [--pool_dtype=bfloat16]
    python tools/memory_plan.py --scale_doc=docs/scale.md      # every ImageNet recipe, the docs' table

The model is built at the recipe's sizes inside a `tf.Graph`, where creating a variable only adds an
initialiser to the graph: nothing is allocated, so the 1.28M-row pools of an ImageNet recipe are counted
from their real shapes and dtypes in a few seconds (one source of truth: the code that trains). Under
tf.distribute every variable here is mirrored, i.e. whole on every replica; the replica count changes
only the per-replica batch and with it the activations and the search's temporaries, estimated from the
same graph: the tensors of the online forward pass of one image that back-propagation keeps (the inputs
of convolutions, matmuls and BatchNorms, the outputs of ReLUs) times the per-replica batch, and one
B x K similarity matrix per searched bank.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from cmsf_tf import config  # noqa: E402

# Training-set sizes of the data sets the recipes name, so a plan needs no data on disk.
KNOWN_SIZES = {"tfds:imagenet2012": (1_281_167, 1000), "imagenet2012": (1_281_167, 1000),
               "fashion_mnist": (60_000, 10), "tfds:fashion_mnist": (60_000, 10)}
RECIPES = ["byol", "msf", "cmsf_2q", "cmsf_km", "sup", "semi10", "semi10_mixed", "xent"]
REPLICAS = [4, 8, 64, 256]  # 4: the authors' 4 GPUs
DEVICES_GB = [16, 32, 80]
MEASURED_SIZES = [64, 96]  # px of the measured step that calibrates the activation estimate (ResNet-50)
GB = 1e9


def _bytes(variable):
    import numpy as np
    import tensorflow as tf

    return int(np.prod(variable.shape, dtype=np.int64)) * tf.as_dtype(variable.dtype).size


def _children(model):
    """(attribute name, layer) for every Keras layer the model holds as an attribute."""
    import keras

    return [(name, value) for name, value in vars(model).items()
            if isinstance(value, keras.layers.Layer) and not name.startswith("_") and value.weights]


def group_state(model):
    """{group: bytes} of every variable the model holds, each counted once, plus `optimizer (SGD momentum)`:
    one float32 slot per variable the optimizer trains. Groups: the model's sub-layers by attribute name
    (online_backbone, bank, pool, ...) and its own variables by name (cluster_ids, train_steps, ...)."""
    seen, groups = set(), {}
    for name, layer in _children(model):
        for v in layer.weights:
            if id(v) not in seen:
                seen.add(id(v))
                groups[name] = groups.get(name, 0) + _bytes(v)
    for v in model.weights:
        if id(v) not in seen:
            seen.add(id(v))
            key = v.path.split("/")[-1]
            groups[key] = groups.get(key, 0) + _bytes(v)
    trained = getattr(model, "online_variables", None) or model.trainable_variables
    groups["optimizer (SGD momentum)"] = sum(_bytes(v) for v in trained)  # Keras SGD: one momentum slot each
    return groups


# What back-propagation keeps of a forward pass: the inputs of the ops whose gradients need them (a
# convolution's or matmul's input for the weight gradient, BatchNorm's input for its own) and the outputs
# of those whose gradients read the output (ReLU). Everything else (BatchNorm's output before the ReLU,
# casts, pads) is transient.
KEPT_INPUTS = ("Conv2D", "MatMul", "BatchMatMulV2", "FusedBatchNormV3", "DepthwiseConv2dNative")
KEPT_OUTPUTS = ("Relu", "Relu6", "Sigmoid", "Tanh")


def _kept_bytes(graph, since, per_image):
    """Bytes per image of the distinct tensors the gradient of the ops created after the first `since`
    ops keeps (KEPT_INPUTS / KEPT_OUTPUTS)."""
    import numpy as np

    kept = {}
    for op in graph.get_operations()[since:]:
        tensors = op.inputs[:1] if op.type in KEPT_INPUTS else op.outputs[:1] if op.type in KEPT_OUTPUTS else []
        for t in tensors:
            if t.dtype.is_floating and t.shape.rank is not None and t.shape.is_fully_defined():
                kept[t.name] = int(np.prod(t.shape.as_list(), dtype=np.int64)) * t.dtype.size
    return sum(kept.values()) // per_image


def plan(cfg, replicas, num_images, num_classes):
    """{"state": {group: bytes}, "activations": bytes, "search": bytes, "per_replica_batch": int, ...} per
    replica for the run `cfg` on `replicas` replicas."""
    import keras
    import tensorflow as tf

    from cmsf_tf.methods import METHODS

    per_image = {}
    graph = tf.Graph()
    previous_policy = keras.mixed_precision.global_policy()
    try:
        with graph.as_default():
            if cfg.mixed_precision != "float32":
                keras.mixed_precision.set_global_policy(f"mixed_{cfg.mixed_precision}")
            # sync_bn=False whatever the replicas: synchronised BatchNorm has the same variables and keeps
            # the same input for its gradient, but as unfused ops that _kept_bytes does not look for.
            model = METHODS[cfg.method].from_run_config(cfg, sync_bn=False, num_images=num_images,
                                                        num_classes=num_classes)
            state = group_state(model)
            probe = 2  # images in the probe batch (BatchNorm's batch statistics want more than one)
            images = tf.compat.v1.placeholder(tf.float32, [probe, cfg.image_size, cfg.image_size, 3])
            start = len(graph.get_operations())
            if hasattr(model, "online_prediction"):
                model.online_prediction(images, training=True)
            else:
                model(images, training=True)
            per_image["activations"] = _kept_bytes(graph, start, probe)
            spec = config.multi_crop_spec(cfg.multi_crop, cfg.image_size)
            if spec and hasattr(model, "online_prediction"):  # N small crops per image: one more online pass
                n, size = spec[:2]
                small = tf.compat.v1.placeholder(tf.float32, [probe * n, size, size, 3])
                start = len(graph.get_operations())
                model.online_prediction(small, training=True)
                per_image["activations"] += _kept_bytes(graph, start, probe)
            searched = [v for v in model.weights if v.path.endswith("embeddings") and v.shape[0] == cfg.bank_size]
            per_image["search"] = len(searched) * cfg.bank_size * 4 if hasattr(model, "bank") else 0
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    one_image = {"method": cfg.method, "replicas": cfg.batch_size, "per_replica_batch": 1, "state": state,
                 **per_image}
    return for_replicas(one_image, cfg.batch_size, replicas)


def measured_activations(cfg, image_size, batch):
    """(measured, estimated) bytes per image of one training pass of the online network at `image_size` px
    and `batch` images. Measured: the peak of TensorFlow's allocator on the first device
    (tf.config.experimental.get_memory_info) during one forward and backward pass, above what was held
    before it, less the gradients (one tensor per trained variable); estimated: plan()'s kept-tensor rule at
    the same size. Built eagerly at that small size, so it runs in seconds on a CPU."""
    import dataclasses

    import tensorflow as tf

    from cmsf_tf.methods import METHODS

    small = dataclasses.replace(cfg, image_size=image_size, batch_size=batch, bank_size=8 * batch,
                                num_clusters=min(cfg.num_clusters, 8 * batch))
    estimated = plan(small, 1, 8 * batch, 10)["activations"] // batch
    model = METHODS[cfg.method].from_run_config(small, sync_bn=False, num_images=8 * batch, num_classes=10)
    forward = getattr(model, "online_prediction", None) or (lambda x, training: model(x, training=training))
    images = tf.random.uniform([batch, image_size, image_size, 3])
    forward(images[:2], training=True)  # builds the variables
    trained = [v.value for v in (getattr(model, "online_variables", None) or model.trainable_variables)]

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(forward(x, training=True), tf.float32))
        return tape.gradient(loss, trained)

    step(images)  # traced and run once: the measured call allocates only what a step needs
    device = (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[0].name
    try:
        tf.config.experimental.reset_memory_stats(device)
    except ValueError:  # TensorFlow's plain CPU allocator (oneDNN off) keeps no statistics
        raise config.UsageError(f"{device}'s allocator keeps no memory statistics, so a step cannot be measured "
                                "here: run with TF_ENABLE_ONEDNN_OPTS=1 (Eigen's kernels with a BFC allocator count large "
                                "transient buffers, 6.4x the kept activations)") from None
    before = tf.config.experimental.get_memory_info(device)["current"]
    grads = step(images)
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    gradients = sum(_bytes(g) for g in grads if g is not None)  # None: a variable this pass does not use
    return (peak - before - gradients) // batch, estimated


def for_replicas(result, batch_size, replicas):
    """`result` (a plan) on `replicas` replicas instead: the state stays, the batch-sized parts scale."""
    if batch_size % replicas:
        raise config.UsageError(f"--batch_size={batch_size} does not divide over {replicas} replicas")
    per_replica = batch_size // replicas
    scale = lambda n: n // result["per_replica_batch"] * per_replica  # noqa: E731 - whole bytes per image
    out = dict(result, replicas=replicas, per_replica_batch=per_replica, activations=scale(result["activations"]),
               search=scale(result["search"]))
    out["total"] = sum(out["state"].values()) + out["activations"] + out["search"]
    return out


def sizes(cfg):
    if cfg.dataset in KNOWN_SIZES:
        return KNOWN_SIZES[cfg.dataset]
    raise config.UsageError(f"the training-set size of {cfg.dataset!r} is not known to this tool: "
                            "pass --num_images and --num_classes")


def report(result):
    lines = [f"{result['method']}: {result['replicas']} replica(s), {result['per_replica_batch']} image(s) per replica; "
             "per replica:"]
    for name, n in sorted(result["state"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:28s} {n / GB:9.3f} GB")
    lines.append(f"  {'activations (kept, est.)':28s} {result['activations'] / GB:9.3f} GB")
    lines.append(f"  {'search temporaries':28s} {result['search'] / GB:9.3f} GB")
    lines.append(f"  {'total':28s} {result['total'] / GB:9.3f} GB")
    return "\n".join(lines)


def recipe_config(name, **overrides):
    """The Config of flags/<name>.cfg with `overrides` (flag name -> value), parsed by absl as `train` parses
    it (nested --flagfile lines are relative to the checkout, hence the directory change while parsing)."""
    config.define_flags(config.TRAIN_SETTINGS)
    argv = ["memory_plan", f"--flagfile=flags/{name}.cfg", "--model_dir=-",
            *(f"--{key}={value}" for key, value in overrides.items())]
    cwd = os.getcwd()
    flags.FLAGS.unparse_flags()
    try:
        os.chdir(ROOT)
        flags.FLAGS(argv)
        return config.from_flags()
    finally:
        os.chdir(cwd)
        flags.FLAGS.unparse_flags()


def scale_doc(path):
    """docs/scale.md's table: every ImageNet recipe at REPLICAS replicas, float32 and bfloat16 pools."""
    rows = ["| recipe | method | precision | pools | replicas | batch / replica | state GB | activations GB | search GB | "
            "total GB | " + " | ".join(f"{d} GB" for d in DEVICES_GB) + " |",
            "|---" * (10 + len(DEVICES_GB)) + "|"]
    for recipe in RECIPES:
        for pool_dtype in ("float32", "bfloat16"):
            cfg = recipe_config(recipe, pool_dtype=pool_dtype)
            built = plan(cfg, 1, *sizes(cfg))
            if pool_dtype != "float32" and "pool" not in built["state"]:
                continue  # no per-image pool: the pool's dtype changes nothing
            for replicas in REPLICAS:
                r = for_replicas(built, cfg.batch_size, replicas)
                fits = ["fits" if r["total"] <= d * GB else "**no**" for d in DEVICES_GB]
                rows.append(f"| {recipe} | {cfg.method} | {cfg.mixed_precision} | {pool_dtype} | {replicas} | {r['per_replica_batch']} | "
                            f"{sum(r['state'].values()) / GB:.2f} | {r['activations'] / GB:.2f} | "
                            f"{r['search'] / GB:.2f} | {r['total'] / GB:.2f} | " + " | ".join(fits) + " |")
    table = "\n".join(rows)
    measured = [f"- {calibration_line(recipe_config('msf'), size, 8)}." for size in MEASURED_SIZES]
    with open(path) as f:
        text = f.read()
    for name, block in (("plan", table), ("measured", "\n".join(measured))):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            raise config.UsageError(f"{path} has no {start} ... {end} markers")
        head, rest = text.split(start, 1)
        text = head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(text)
    print(table + "\n" + "\n".join(measured))


def main(argv):
    del argv
    try:
        run_plan(flags.FLAGS)
    except config.UsageError as e:  # bad input: one sentence and exit 2, as every command line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def calibration_line(cfg, image_size, batch):
    """One sentence: the measured activations at a small size beside the estimate, scaled to the recipe's."""
    measured, estimated = measured_activations(cfg, image_size, batch)
    ratio = measured / estimated
    scaled = plan(cfg, 1, 8 * cfg.batch_size, 10)["activations"] / cfg.batch_size * ratio
    return (f"activations measured for one {cfg.method} step at {image_size} px, {batch} images: "
            f"{measured / 1e6:.2f} MB per image (estimate {estimated / 1e6:.2f} MB, ratio {ratio:.2f}); scaled to "
            f"{cfg.image_size} px: {scaled / 1e6:.1f} MB per image")


def run_plan(F):
    if F.scale_doc:
        return scale_doc(F.scale_doc)
    cfg = config.from_flags()
    num_images, num_classes = (F.num_images, F.num_classes) if F.num_images else sizes(cfg)
    print(report(plan(cfg, F.replicas, num_images, num_classes)))
    if F.measure_size:
        print(calibration_line(cfg, F.measure_size, F.measure_batch))


if __name__ == "__main__":
    config.define_flags(config.TRAIN_SETTINGS)
    config.quiet_tensorflow()
    flags.DEFINE_integer("replicas", 1, "replicas the global --batch_size is split over")
    flags.DEFINE_integer("num_images", 0, "training images (0: the known size of --dataset)")
    flags.DEFINE_integer("num_classes", 0, "classes (with --num_images)")
    flags.DEFINE_string("scale_doc", "", "rewrite the table between the plan markers of this Markdown file")
    flags.DEFINE_integer("measure_size", 0, "also measure one step's activations at this image size (px) and "
                         "scale them to the recipe's (0: estimate only); on a CPU it needs oneDNN's allocator statistics: "
                         "TF_ENABLE_ONEDNN_OPTS=1 where TensorFlow leaves oneDNN off")
    flags.DEFINE_integer("measure_batch", 8, "images of the measured step")
    flags.FLAGS.set_default("model_dir", "-")  # a plan writes no run directory
    app.run(main)

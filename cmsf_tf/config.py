"""Every setting of the command lines, grouped by owner, and the validated configs the library takes.

A setting is one row (cmsf_tf.settings.Setting: name, kind, default, help, its rule, whether it is part of
a run's identity). The rows have owners: the common training settings are here, a method's own are in its
registry entry (cmsf_tf.methods), a protocol's in its module (cmsf_tf.eval.protocols), the export's and
the network's below. `command_settings(command)` says which rows a command line defines — its own and no
others, so absl refuses a foreign flag naming it. The `Config` and `EvalConfig` dataclasses, the checks
and the run identity are made from the rows. Importing this module defines no flag and loads no
TensorFlow: the entry points call `run_entry_point`, so a program that imports cmsf_tf can define its own
flags. `from_flags()` / `eval_from_flags()` validate every flag at start-up; `make()` does the same from
keyword arguments. Any problem is raised as a UserError (`UsageError`) with one sentence for the user.
"""

import dataclasses
import os
import sys

from absl import flags

from cmsf_tf import methods
from cmsf_tf.data import labels, sources
from cmsf_tf.errors import UserError
from cmsf_tf.eval.protocols import PROTOCOLS as _PROTOCOL_MODULES
from cmsf_tf.models import ARCHS
from cmsf_tf.settings import BELOW_ONE, FRACTION, POSITIVE, PROBABILITY, Setting
from cmsf_tf.rundir import RENAMED, upgrade_flags  # noqa: F401  (renamed settings: aliases here, flags.json there)

# Bad flag values: the errors' common base (cmsf_tf.errors), under the name the library has always used.
UsageError = UserError


def quiet_tensorflow():
    """Before TensorFlow loads: INFO and WARNING lines off, and on a machine without an NVIDIA driver
    also the ERROR line of the CUDA plugin's failed cuInit, which is the only C++ error such a machine
    prints on every start. TF_CPP_MIN_LOG_LEVEL set by the user wins."""
    no_gpu = not os.path.exists("/dev/nvidiactl") and not os.path.exists("/proc/driver/nvidia")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if no_gpu else "2")


_METHODS = methods.names()  # the registries' names, without loading TensorFlow
_ARCHS = tuple(ARCHS)
_STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_PRECISIONS = ("float32", "bfloat16", "float16")
_JIT = ("auto", "true", "false")

COMMON_TRAIN_SETTINGS = (
    Setting("method", "string", "msf",
            f"Training method: {', '.join(_METHODS)}.", choices=_METHODS, identity=True),
    Setting("dataset", "string", "fashion_mnist",
            f"Data set: {', '.join(sources.DATASETS)}.", identity=True),
    Setting("data_dir", "string", "",
            "Directory of the data set (default: the data set's usual place)."),
    Setting("class_list", "string", "",
            "--dataset=folder: only these class folders (imagenet100: the CMSF code's "
            "subset; imagenet100_cmc: CMC's; or a file of folder names, one per line).", identity=True),
    Setting("max_corrupt_fraction", "float", 0.001,
            "--dataset=folder: corrupt images are skipped and reported; "
            "more than this fraction of a split is an error.", rule=PROBABILITY),
    Setting("shuffle_buffer", "integer", 10000,
            "Shuffle buffer of record sources (tfrecord, streamed TFDS).", minimum=1),
    Setting("model_dir", "string", None,
            "Where the run writes flags.json, checkpoints/, tensorboard/, result.json."),
    Setting("arch", "string", "resnet50",
            f"Backbone: {', '.join(_ARCHS)} (resnet18_small: 3x3 stem for 28-64 px).", choices=_ARCHS, identity=True),
    Setting("width", "integer", 64,
            "Channels of the first ResNet stage (64 = standard; smaller for CPU demos).", minimum=1, identity=True),
    Setting("image_size", "integer", 224,
            "Side of the training and evaluation crops, in pixels.", minimum=1, identity=True),
    Setting("epochs", "integer", 200,
            "Training epochs.", minimum=1),
    Setting("batch_size", "integer", 256,
            "Global batch size (over all replicas).", minimum=1, identity=True),
    Setting("learning_rate", "float", 0.05,
            "Peak SGD learning rate (used as given; not rescaled by batch size).", rule=POSITIVE),
    Setting("warmup_epochs", "integer", 0,
            "Linear learning-rate warm-up before the cosine decay.", minimum=0),
    Setting("momentum", "float", 0.9,
            "SGD momentum."),
    Setting("weight_decay", "float", 1e-4,
            "L2 penalty on every weight (PyTorch SGD weight_decay semantics)."),
    Setting("ema_momentum", "float", 0.99,
            "Target network EMA momentum m: target = m*target + (1-m)*online.", rule=BELOW_ONE),
    Setting("bank_size", "integer", 128000,
            "Rows of the memory bank; a multiple of --batch_size.", minimum=1, identity=True),
    Setting("topk", "integer", 5,
            "Neighbours the query is pulled towards (byol uses 1).", minimum=1, identity=True),
    Setting("pool_dtype", "string", "float32",
            "cmsf_2q/cmsf_km per-image pool: float32 or bfloat16 (half the "
            "memory; ImageNet x 512: 2Q 5.2 / 2.6 GB, KM 2.6 / 1.3 GB per replica).", choices=("float32", "bfloat16"), identity=True),
    Setting("constraint_fill", "string", "nearest",
            "cmsf_sup/cmsf_km/cmsf_pseudo: when fewer than --topk bank rows "
            "satisfy the constraint, fill with the query's nearest other rows (nearest) or with arbitrary "
            "rows as the paper's code does (official: every other row at distance 5.0, ties).", choices=("nearest", "official"), identity=True),
    Setting("crop_min_scale", "float", 0.2,
            "Smallest area fraction of the random resized crops (paper: 0.2).", rule=FRACTION),
    Setting("blur_prob", "float", 0.5,
            "Probability of Gaussian blur in the strong view (paper: 0.5 at 224 px).", rule=PROBABILITY),
    Setting("multi_crop", "string", "",
            "N:SIZE[:MIN_SCALE:MAX_SCALE]: N extra small crops per image (SIZE px, area fraction "
            "MIN-MAX of the image, default 0.05-0.14 as SwAV/DINO; ImageNet: 6:96), augmented as the strong "
            "view; queries only, pulled towards the strong view's neighbours (mean-shift methods).",
            identity=True),
    Setting("label_split", "string", "",
            "Labelled subset: percent:P (class-stratified, seeded by --seed), "
            "imagenet_1percent / imagenet_10percent (the paper's ImageNet lists, shipped), or a file of "
            "image names (tools/make_label_split.py); the other training images get label -1. Empty: every "
            "image is labelled.", identity=True),
    Setting("label_noise", "float", 0.0,
            "Percent of training labels replaced by another class (seeded by --seed).", identity=True, rule=("must be in [0, 100) percent", lambda v: 0 <= v < 100)),
    Setting("label_noise_file", "string", "",
            "A corruption list instead: lines '<image name> <label>' that replace "
            "those images' training labels; the paper's lists ('<class dir>/<file name> <class index>' for "
            "every training image) are read as they are.", identity=True),
    Setting("proj_hidden", "integer", 0,
            "Hidden width of projector and predictor (0: 2 x backbone features).", minimum=0, identity=True),
    Setting("proj_dim", "integer", 0,
            "Embedding dimension (0: backbone features / 4, i.e. 512 for ResNet-50).", minimum=0, identity=True),
    Setting("strategy", "string", "default",
            f"tf.distribute strategy: {', '.join(_STRATEGIES)}.", choices=_STRATEGIES),
    Setting("cpu_devices", "integer", 1,
            "With --strategy=mirrored and no GPU: logical CPU devices to mirror over.", minimum=1),
    Setting("tpu", "string", "",
            "TPU name or address for --strategy=tpu."),
    Setting("jit_compile", "string", "auto",
            "Compile the train step (and the epoch-end k-means, pseudo-label head and k-NN features) with "
            "XLA: auto (on under --strategy=tpu, where XLA is mandatory, and on one GPU; off on CPUs, where "
            "it is slower, and under mirrored/multi_worker), true or false.", choices=_JIT),
    Setting("mixed_precision", "string", "float32",
            f"Compute dtype policy: {', '.join(_PRECISIONS)}.", choices=_PRECISIONS),
    Setting("seed", "integer", 0,
            "Seed of weights, data order and augmentations.", identity=True),
    Setting("init_from", "string", "",
            "A new run's starting weights: a run directory (its newest checkpoint) or a checkpoint prefix, "
            "e.g. PyTorch weights converted by python -m cmsf_tf.convert from_torch. Online and target "
            "backbones, and the projectors and predictor where it has them, start from it; ignored on resume."),
    Setting("steps_per_epoch", "integer", 0,
            "Cap on steps per epoch (0: the whole training set), for smoke runs.", minimum=0, identity=True),
    Setting("checkpoint_steps", "integer", 500,
            "Also checkpoint every this many steps (0: only at epoch ends).", minimum=0),
    Setting("stop_after_steps", "integer", 0,
            "Stop (resumably) once this many global steps are done (0: never).", minimum=0),
    Setting("log_steps", "integer", 50,
            "Write step-level TensorBoard scalars every this many steps.", minimum=0),
    Setting("deterministic", "bool", False,
            "Deterministic TF ops (bit-exact resume checks; slower)."),
    Setting("knn_eval", "bool", True,
            "Evaluate 1-NN and 20-NN on the test split at the end into result.json."),
    Setting("final_linear_probe", "bool", False,
            "Beside the final k-NN (and each --knn_baselines row), the test top-1 of the paper's linear "
            "probe trained on the same cached centre-crop features (40 epochs; seconds on Fashion-MNIST, "
            "long on ImageNet: use cmsf_tf.evaluate linear there)."),
    Setting("knn_baselines", "bool", False,
            "Also report k-NN of the untrained network and of raw pixels."),
    Setting("eval_batch_size", "integer", 512,
            "Batch size of feature extraction.", minimum=1),
    Setting("knn_every", "integer", 0,
            "Every this many epochs (and after the last), 1-NN and 20-NN top-1 of the online "
            "backbone on a fixed subset of the test split, into TensorBoard eval/knn_* and "
            "knn_curve.jsonl (0: never).", minimum=0),
    Setting("knn_every_queries", "integer", 2000,
            "--knn_every: test images evaluated (evenly spaced; 0: all).", minimum=0),
    Setting("knn_every_index", "integer", 0,
            "--knn_every: training images in the index (evenly spaced; 0: all).", minimum=0),
)
# Every setting of a training run: the common ones, then each method's own (cmsf_tf.methods).
TRAIN_SETTINGS = COMMON_TRAIN_SETTINGS + methods.own_settings()


FLAGS = flags.FLAGS


def run_entry_point(main, command):
    """What every command line (train, evaluate, export, convert) does before its main: define the flags of
    `command` (and no others: a flag of another command is refused by absl, naming it), quiet TensorFlow
    before it loads, and absl's log at WARNING (TF's checkpoint and SavedModel writers log every file at
    INFO, which drowns the progress bar). A UserError out of main is printed as one sentence, exit 2."""
    from absl import app, logging

    from cmsf_tf.errors import exit_on_user_error

    define_flags(command_settings(command, sys.argv[1:]))
    flags.mark_flag_as_required("model_dir")
    quiet_tensorflow()
    logging.set_verbosity(logging.WARNING)
    app.run(exit_on_user_error(main))


def define_flags(settings=None, flag_values=FLAGS):
    """Defines the absl flags of `settings` (default: every setting of every command, for programs that
    parse several command lines in one process) and the old names of renamed ones. Idempotent."""
    for setting in TRAIN_SETTINGS + EVAL_SETTINGS if settings is None else settings:
        setting.define(flag_values)
    for old, new in RENAMED.items():
        if new in flag_values and old not in flag_values:
            flags.DEFINE_alias(old, new, flag_values=flag_values)


def _to_dict(self):
    return dataclasses.asdict(self)


# The frozen config of a training run: one field per TRAIN_SETTINGS row, in its order.
Config = dataclasses.make_dataclass("Config", [(s.name, object) for s in TRAIN_SETTINGS], frozen=True,
                                    namespace={"to_dict": _to_dict, "__module__": __name__})
RUN_IDENTITY = tuple(s.name for s in TRAIN_SETTINGS if s.identity)
_TRAIN = {s.name: s for s in TRAIN_SETTINGS}


def _flag_value(name, value):
    return tuple(value) if _TRAIN[name].kind == "list" else value


def from_flags():
    """The validated Config of the parsed command line (define_flags() first)."""
    cfg = Config(**{s.name: _flag_value(s.name, FLAGS[s.name].value) for s in TRAIN_SETTINGS})
    validate(cfg)
    return cfg


def make(**values):
    """A validated Config from the settings' defaults and `values`: the programmatic way to describe a run
    (no flags involved)."""
    unknown = set(values) - set(_TRAIN)
    if unknown:
        raise UsageError(f"unknown settings: {', '.join(sorted(unknown))}")
    cfg = Config(**{s.name: _flag_value(s.name, values.get(s.name, s.default)) for s in TRAIN_SETTINGS})
    validate(cfg)
    return cfg


MULTI_CROP_SCALE = (0.05, 0.14)  # SwAV's and DINO's small crops


def multi_crop_spec(value, image_size):
    """(n, size, min_scale, max_scale) of a --multi_crop value, or None for "" (no small crops)."""
    if not value:
        return None
    form = (f"--multi_crop {value!r} is not N:SIZE[:MIN_SCALE:MAX_SCALE] (e.g. 6:96 or 6:96:0.05:0.14)")
    parts = value.split(":")
    if len(parts) not in (2, 4):
        raise UsageError(form)
    try:
        n, size = int(parts[0]), int(parts[1])
        low, high = (float(parts[2]), float(parts[3])) if len(parts) == 4 else MULTI_CROP_SCALE
    except ValueError:
        raise UsageError(form) from None
    if n < 1 or not 1 <= size <= image_size:
        raise UsageError(f"{form}: N must be at least 1 and SIZE between 1 and --image_size {image_size}")
    if not 0 < low <= high <= 1:
        raise UsageError(f"{form}: the scales need 0 < MIN_SCALE <= MAX_SCALE <= 1")
    return n, size, low, high


def label_split_percent(value):
    """P of a --label_split of the form percent:P (0 < P <= 100); None for a names file; LabelError
    (a UserError) for anything else."""
    return labels.split_percent(value)


def validate(cfg):
    """Raises UsageError on the first problem with the flag values (data and paths are checked later)."""
    for setting in TRAIN_SETTINGS:  # each setting's own rule (finite, choices, minimum, range) from its row
        setting.check(getattr(cfg, setting.name))
    if not sources.is_known(cfg.dataset):
        raise UsageError(f"unknown --dataset {cfg.dataset!r}; choose one of: {', '.join(sources.DATASETS)}")
    methods.check(cfg)  # the method's own checks across its settings
    multi_crop_spec(cfg.multi_crop, cfg.image_size)
    if cfg.label_noise_file and (cfg.label_noise or not os.path.isfile(cfg.label_noise_file)):
        raise UsageError(f"--label_noise_file {cfg.label_noise_file} does not exist or is combined with --label_noise")
    if cfg.label_split:
        label_split_percent(cfg.label_split)
    if cfg.bank_size % cfg.batch_size:
        raise UsageError(f"--bank_size {cfg.bank_size} is not a multiple of the global --batch_size "
                         f"{cfg.batch_size}; a batch must never straddle the end of the bank")
    if cfg.topk > cfg.bank_size:
        raise UsageError(f"--topk {cfg.topk} is larger than --bank_size {cfg.bank_size}")
    if cfg.cpu_devices > 1 and cfg.strategy != "mirrored":
        raise UsageError("--cpu_devices > 1 needs --strategy=mirrored")
    _check_jit_compile(cfg)


def _check_jit_compile(cfg):
    """The --jit_compile settings that cannot compile, refused before TensorFlow loads (docs/accelerators.md)."""
    if cfg.jit_compile == "false" and cfg.strategy == "tpu":
        raise UsageError("--jit_compile=false cannot apply under --strategy=tpu: TPUStrategy compiles every step "
                         "with XLA (leave --jit_compile=auto)")
    if cfg.jit_compile != "true":
        return
    if cfg.strategy in ("mirrored", "multi_worker"):
        raise UsageError(f"--jit_compile=true cannot compile under --strategy={cfg.strategy}: TensorFlow runs the "
                         "cross-replica gather of the memory bank (all_gather) and the bank's first-replica "
                         "writes through merge_call, which an XLA-compiled replica step cannot contain; use "
                         "--jit_compile=auto (XLA off) or one device")
    if cfg.deterministic:
        raise UsageError("--jit_compile=true cannot be combined with --deterministic: TensorFlow's deterministic "
                         "ops are not XLA ops, and Keras would silently train without XLA")


# ----- python -m cmsf_tf.evaluate / export / convert -----
PROTOCOLS = tuple(_PROTOCOL_MODULES)

# The settings of the network evaluated (evaluate, export, convert to_torch).
NETWORK_SETTINGS = (
    Setting("checkpoint", "string", "",
            "evaluate/export: checkpoint prefix (default: the newest in --model_dir)."),
    Setting("encoder", "string", "online",
            "evaluate/export: the online backbone or the EMA target's.", choices=("online", "target")),
)
# Every evaluation protocol's common settings beside the data ones it shares with training (EVAL_DATA).
EVAL_COMMON = NETWORK_SETTINGS + (
    Setting("saved_model", "string", "",
            "evaluate: an exported SavedModel instead of a checkpoint (results go to "
            "--model_dir/eval/)."),
    Setting("cache_features", "bool", True,
            "knn/linear: keep extracted features in --model_dir/eval/features/ and "
            "reuse them (a re-run with another k or vote is instant)."),
)
# Training settings evaluate also takes: where the run is, and the data (None when not given: the run's own).
EVAL_DATA = tuple(_TRAIN[name] for name in ("model_dir", "dataset", "data_dir", "class_list", "label_split",
                                            "image_size", "seed", "eval_batch_size"))
_GIVEN_OR_RUN = ("dataset", "data_dir", "class_list", "label_split", "image_size")
EXPORT_SETTINGS = (
    Setting("export_dir", "string", "",
            "export: the SavedModel directory to write."),
    Setting("index", "string", "",
            "export: train adds a k-NN index of the training set's features and labels "
            "(the `neighbours` and `classify` endpoints: evaluate knn's k and vote; --knn_search=exact "
            "serves with stock TensorFlow ops, approx with ScaNN's, which the loading process must "
            "import; --index_split=labelled: only the labelled images).", choices=("train",)),
    Setting("index_dtype", "string", "float32",
            "export: the dtype the exact index's features are stored in (bfloat16: half the bytes; each "
            "similarity is then exact to ~3 significant digits, so near-tied neighbours may swap).",
            choices=("float32", "bfloat16")),
)
CONVERT_SETTINGS = (
    Setting("output", "string", "",
            "convert to_torch: the file to write, .pth (needs PyTorch) or .safetensors."),
)
_PROTOCOL_SETTINGS = tuple(row for module in _PROTOCOL_MODULES.values() for row in module.SETTINGS)
# Every setting that is not a training one (names unique across both tables).
EVAL_SETTINGS = EVAL_COMMON + EXPORT_SETTINGS + CONVERT_SETTINGS + _PROTOCOL_SETTINGS
_EVAL = {s.name: s for s in EVAL_SETTINGS}


def command_settings(command, args=()):
    """The rows a command line defines. evaluate: the protocol named in `args` decides."""
    if command == "train":
        return TRAIN_SETTINGS
    if command == "convert":
        return TRAIN_SETTINGS + NETWORK_SETTINGS + CONVERT_SETTINGS
    knn = _PROTOCOL_MODULES["knn"].SETTINGS
    if command == "export":  # --index is evaluate knn's index, with its settings
        return EVAL_DATA + EVAL_COMMON + EXPORT_SETTINGS + knn
    if command == "evaluate":
        # The protocol is the first word that names one (`--model_dir x knn` has a flag's value first).
        # Without one (`evaluate --helpfull`), every protocol's flags, so that the help lists them all.
        named = [_PROTOCOL_MODULES[a] for a in args if a in _PROTOCOL_MODULES]
        return EVAL_DATA + EVAL_COMMON + (named[0].SETTINGS if named else _PROTOCOL_SETTINGS)
    raise ValueError(f"unknown command {command!r}")


# The frozen config of an evaluation: the protocol, then one field per evaluation row (every protocol's:
# a protocol reads its own, the others keep their defaults).
_EVAL_ROWS = EVAL_DATA + EVAL_COMMON + _PROTOCOL_SETTINGS
EvalConfig = dataclasses.make_dataclass(
    "EvalConfig", [("protocol", str)] + [(s.name, object) for s in _EVAL_ROWS],
    frozen=True, namespace={"to_dict": _to_dict, "__module__": __name__})


def _eval_value(setting):
    """A setting's value: the flag's where the command line defines it, else its default; converted
    (lists) and checked by its row."""
    defined = setting.name in FLAGS
    if setting.name in _GIVEN_OR_RUN:  # not given: the run's own (flags.json)
        return FLAGS[setting.name].value if defined and FLAGS[setting.name].present else None
    value = FLAGS[setting.name].value if defined else setting.default
    if setting.convert is not None:
        return setting.convert(setting.name, value)
    setting.check(value)
    return value


def eval_from_flags(protocol):
    """The validated EvalConfig of `python -m cmsf_tf.evaluate PROTOCOL --flags`. Data flags not given
    on the command line are None: the run's own (flags.json) apply."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    cfg = EvalConfig(protocol=protocol, **{s.name: _eval_value(s) for s in _EVAL_ROWS})
    if cfg.dataset is not None and not sources.is_known(cfg.dataset):
        raise UsageError(f"unknown --dataset {cfg.dataset!r}; choose one of: {', '.join(sources.DATASETS)}")
    if cfg.label_split:
        label_split_percent(cfg.label_split)
    if cfg.saved_model and cfg.checkpoint:
        raise UsageError("give --saved_model or --checkpoint, not both")
    check = getattr(_PROTOCOL_MODULES[protocol], "check", None)
    if check is not None:
        check(cfg)
    return cfg


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    model_dir: str
    checkpoint: str
    encoder: str
    export_dir: str
    index: str
    knn: object = None  # with --index: the EvalConfig of evaluate knn (data, k, vote, search, index split)
    index_dtype: str = "float32"


def export_from_flags():
    cfg = ExportConfig(FLAGS.model_dir, FLAGS.checkpoint, FLAGS.encoder, FLAGS.export_dir, FLAGS.index,
                       eval_from_flags("knn") if FLAGS.index else None, FLAGS.index_dtype)
    _EVAL["encoder"].check(cfg.encoder)
    _EVAL["index_dtype"].check(cfg.index_dtype)
    if cfg.index:
        _EVAL["index"].check(cfg.index)
    if cfg.index_dtype != "float32" and (not cfg.index or cfg.knn.knn_search != "exact"):
        raise UsageError("--index_dtype applies to the exact index only (--index=train --knn_search=exact)")
    if not cfg.export_dir:
        raise UsageError("--export_dir is required: where to write the SavedModel")
    return cfg

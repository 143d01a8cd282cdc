"""Every setting of the command lines, written once, and the validated configs the library takes.

Each setting is one row of TRAIN_SETTINGS or EVAL_SETTINGS (name, kind, default, help, its check, whether
it is part of a run's identity); the absl flags, the `Config` dataclass, the generic checks and the run
identity are made from the rows. Importing this module defines no flag: the entry points (cmsf_tf.train,
cmsf_tf.evaluate, cmsf_tf.export) call `define_flags()`, so a program that imports cmsf_tf can define
its own flags. `from_flags()` validates every flag at start-up and returns a frozen `Config`; `make()`
does the same from keyword arguments. Any problem is raised as `UsageError` with one sentence for the user.
"""

import dataclasses
import math
import os

from absl import flags

from cmsf_tf.data import labels, sources


class UsageError(Exception):
    """Bad input from the user: printed as one sentence, exit code 2."""


def quiet_tensorflow():
    """Before TensorFlow loads: INFO and WARNING lines off, and on a machine without an NVIDIA driver
    also the ERROR line of the CUDA plugin's failed cuInit, which is the only C++ error such a machine
    prints on every start. TF_CPP_MIN_LOG_LEVEL set by the user wins."""
    no_gpu = not os.path.exists("/dev/nvidiactl") and not os.path.exists("/proc/driver/nvidia")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if no_gpu else "2")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One command-line setting. `kind`: string, integer, float, bool or list (absl's DEFINE_<kind>).
    `minimum` (integers): the smallest value allowed; `choices` (strings): the values allowed;
    `identity`: part of what makes a run the run it is (resuming it with another value is refused)."""

    name: str
    kind: str
    default: object
    help: str
    minimum: object = None
    choices: tuple = ()
    identity: bool = False

    def check(self, value):
        """Raises UsageError when `value` breaks this setting's own rule."""
        if self.choices and value not in self.choices:
            raise UsageError(f"unknown --{self.name} {value!r}; choose one of: {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            rule = "must not be negative" if self.minimum == 0 else f"must be at least {self.minimum}"
            raise UsageError(f"--{self.name} {rule} (got {value})")


_METHODS = ("byol", "msf", "cmsf_2q", "cmsf_km", "cmsf_sup", "cmsf_pseudo", "xent")  # checked against cmsf_tf.methods.METHODS by the tests
_ARCHS = ("resnet50", "resnet18", "resnet18_small")
_STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_PRECISIONS = ("float32", "bfloat16", "float16")
_JIT = ("auto", "true", "false")

TRAIN_SETTINGS = (
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
            "more than this fraction of a split is an error."),
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
            "Peak SGD learning rate (used as given; not rescaled by batch size)."),
    Setting("warmup_epochs", "integer", 0,
            "Linear learning-rate warm-up before the cosine decay.", minimum=0),
    Setting("momentum", "float", 0.9,
            "SGD momentum."),
    Setting("weight_decay", "float", 1e-4,
            "L2 penalty on every weight (PyTorch SGD weight_decay semantics)."),
    Setting("ema_momentum", "float", 0.99,
            "Target network EMA momentum m: target = m*target + (1-m)*online."),
    Setting("bank_size", "integer", 128000,
            "Rows of the memory bank; a multiple of --batch_size.", minimum=1, identity=True),
    Setting("topk", "integer", 5,
            "Neighbours the query is pulled towards (byol uses 1).", minimum=1, identity=True),
    Setting("topk_prime", "integer", 5,
            "cmsf_2q: neighbours k' of the previous view that form the constraint set.", minimum=1, identity=True),
    Setting("cmsf_2q_view", "string", "pool",
            "cmsf_2q: where t' comes from: pool (each image's previous target, "
            "kept per image) or third (a third augmentation through the target every step: one more "
            "target forward pass per image, no pool memory).", choices=("pool", "third"), identity=True),
    Setting("pool_dtype", "string", "float32",
            "cmsf_2q/cmsf_km per-image pool: float32 or bfloat16 (half the "
            "memory; ImageNet x 512: 2Q 5.2 / 2.6 GB, KM 2.6 / 1.3 GB per replica).", choices=("float32", "bfloat16"), identity=True),
    Setting("constraint_fill", "string", "nearest",
            "cmsf_sup/cmsf_km/cmsf_pseudo: when fewer than --topk bank rows "
            "satisfy the constraint, fill with the query's nearest other rows (nearest) or with arbitrary "
            "rows as the paper's code does (official: every other row at distance 5.0, ties).", choices=("nearest", "official"), identity=True),
    Setting("num_clusters", "integer", 50000,
            "cmsf_km: k-means clusters (paper: 50,000 on ImageNet).", minimum=1, identity=True),
    Setting("kmeans_iters", "integer", 20,
            "cmsf_km: k-means iterations per epoch end.", minimum=1),
    Setting("kmeans_init", "string", "random",
            "cmsf_km: random or kmeans++ (greedy k-means++: better clusters, "
            "k sequential passes over the pool; too slow for 50,000 clusters of ImageNet).", choices=("random", "kmeans++")),
    Setting("conf_threshold", "float", 0.85,
            "cmsf_pseudo: smallest pseudo-label probability that constrains an "
            "unlabelled query (below it: plain MSF neighbours).", identity=True),
    Setting("labelled_cache_size", "integer", 128000,
            "cmsf_pseudo: rows of the LabelledCache, the ring of labelled target embeddings the "
            "pseudo-label head trains on (the official code's --sup_mem_bank_size; formerly "
            "--sup_bank_size, still accepted).", identity=True),
    Setting("pseudo_cache_confident", "bool", False,
            "cmsf_pseudo: also cache confidently pseudo-labelled images."),
    Setting("pseudo_epochs", "integer", 10,
            "cmsf_pseudo: passes over the cache per head-training round (a round at "
            "the middle and at the end of every epoch)."),
    Setting("pseudo_lr", "float", 0.01,
            "cmsf_pseudo: SGD learning rate of the head (momentum 0.9; paper: 0.01)."),
    Setting("pseudo_weight_decay", "float", 1e-4,
            "cmsf_pseudo: weight decay of the head's SGD (paper: 1e-4)."),
    Setting("pseudo_milestones", "list", ["15", "30", "40"],
            "cmsf_pseudo: passes after which the head's lr is divided "
            "by 10 (the paper's code: 15,30,40, which 10 passes never reach, so the lr stays constant)."),
    Setting("pseudo_batch_size", "integer", 256,
            "cmsf_pseudo: batch size of head training."),
    Setting("label_smoothing", "float", 0.0,
            "xent: label smoothing of the cross-entropy targets.", identity=True),
    Setting("crop_min_scale", "float", 0.2,
            "Smallest area fraction of the random resized crops (paper: 0.2)."),
    Setting("blur_prob", "float", 0.5,
            "Probability of Gaussian blur in the strong view (paper: 0.5 at 224 px)."),
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
            "Percent of training labels replaced by another class (seeded by --seed).", identity=True),
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

FLAGS = flags.FLAGS


def run_entry_point(main):
    """What every command line (train, evaluate, export, convert) does before its main: define the flags,
    quiet TensorFlow before it loads, and absl's log at WARNING (TF's checkpoint and SavedModel writers log
    every file at INFO, which drowns the progress bar)."""
    from absl import app, logging

    define_flags()
    quiet_tensorflow()
    logging.set_verbosity(logging.WARNING)
    app.run(main)


def define_flags():
    """Defines the absl flags of every setting (train, evaluate and export share one namespace, as the
    CLIs share flag names). Idempotent. Called by the entry points before absl parses the command line;
    --model_dir is required there."""
    first_call = "model_dir" not in FLAGS
    for setting in TRAIN_SETTINGS + EVAL_SETTINGS:
        if setting.name not in FLAGS:
            getattr(flags, f"DEFINE_{setting.kind}")(setting.name, setting.default, setting.help)
    for old, new in RENAMED.items():
        if old not in FLAGS:
            flags.DEFINE_alias(old, new)
    if first_call:  # one validator, not one more per call
        flags.mark_flag_as_required("model_dir")


# Settings renamed since: old name -> new name. The old flag stays an alias; a run directory written
# with the old name (flags.json) reads as the new one (upgrade_flags).
RENAMED = {"sup_bank_size": "labelled_cache_size"}


def upgrade_flags(saved):
    """A run's flags.json dict with renamed settings under their current names."""
    return {RENAMED.get(name, name): value for name, value in saved.items()}


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
    """P of a --label_split of the form percent:P (0 < P <= 100); None for a names file; UsageError
    for anything else."""
    try:
        return labels.split_percent(value)
    except labels.LabelError as e:
        raise UsageError(str(e)) from None


def _finite(cfg):
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{field.name} must be a finite number (got {value})")


def validate(cfg):
    """Raises UsageError on the first problem with the flag values (data and paths are checked later)."""
    _finite(cfg)
    for setting in TRAIN_SETTINGS:  # each setting's own rule (choices, minimum) from its row
        setting.check(getattr(cfg, setting.name))
    if not sources.is_known(cfg.dataset):
        raise UsageError(f"unknown --dataset {cfg.dataset!r}; choose one of: {', '.join(sources.DATASETS)}")
    if not cfg.learning_rate > 0:
        raise UsageError(f"--learning_rate must be positive (got {cfg.learning_rate})")
    if cfg.method == "cmsf_pseudo":
        if not cfg.label_split:
            raise UsageError("--method=cmsf_pseudo needs --label_split (with every image labelled, use cmsf_sup)")
        if not 0 < cfg.conf_threshold <= 1:
            raise UsageError(f"--conf_threshold must be in (0, 1] (got {cfg.conf_threshold})")
        if cfg.labelled_cache_size < cfg.batch_size:
            raise UsageError(f"--labelled_cache_size {cfg.labelled_cache_size} is smaller than the global --batch_size "
                             f"{cfg.batch_size}; one batch must fit in the cache")
        _ints("pseudo_milestones", cfg.pseudo_milestones, 0)
        for name in ("pseudo_epochs", "pseudo_batch_size"):
            if getattr(cfg, name) < 1:
                raise UsageError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
        if not cfg.pseudo_lr > 0:
            raise UsageError(f"--pseudo_lr must be positive (got {cfg.pseudo_lr})")
        if not cfg.pseudo_weight_decay >= 0:
            raise UsageError(f"--pseudo_weight_decay must not be negative (got {cfg.pseudo_weight_decay})")
    if not 0 <= cfg.label_smoothing < 1:
        raise UsageError(f"--label_smoothing must be in [0, 1) (got {cfg.label_smoothing})")
    if not 0 < cfg.crop_min_scale <= 1:
        raise UsageError(f"--crop_min_scale must be in (0, 1] (got {cfg.crop_min_scale})")
    if not 0 <= cfg.blur_prob <= 1:
        raise UsageError(f"--blur_prob must be in [0, 1] (got {cfg.blur_prob})")
    if multi_crop_spec(cfg.multi_crop, cfg.image_size) and cfg.method == "xent":
        raise UsageError("--multi_crop adds queries to the mean-shift methods; --method=xent has none")
    if not 0 <= cfg.max_corrupt_fraction <= 1:
        raise UsageError(f"--max_corrupt_fraction must be in [0, 1] (got {cfg.max_corrupt_fraction})")
    if not 0 <= cfg.label_noise < 100:
        raise UsageError(f"--label_noise must be in [0, 100) percent (got {cfg.label_noise})")
    if cfg.label_noise_file and (cfg.label_noise or not os.path.isfile(cfg.label_noise_file)):
        raise UsageError(f"--label_noise_file {cfg.label_noise_file} does not exist or is combined with --label_noise")
    if cfg.label_split:
        label_split_percent(cfg.label_split)
    if not 0 <= cfg.ema_momentum < 1:
        raise UsageError(f"--ema_momentum must be in [0, 1) (got {cfg.ema_momentum})")
    if cfg.bank_size % cfg.batch_size:
        raise UsageError(f"--bank_size {cfg.bank_size} is not a multiple of the global --batch_size "
                         f"{cfg.batch_size}; a batch must never straddle the end of the bank")
    if cfg.method == "cmsf_2q" and cfg.topk_prime < cfg.topk:
        raise UsageError(f"--topk_prime {cfg.topk_prime} must be at least --topk {cfg.topk} (the constrained "
                         "neighbours are chosen among the k' candidates)")
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


# ----- python -m cmsf_tf.evaluate / python -m cmsf_tf.export -----
PROTOCOLS = ("knn", "linear", "semi", "finetune", "transfer", "projector")
# The paper's transfer data sets that TFDS has (FGVC Aircraft is not in TFDS: add it as folder:PATH).
TRANSFER_DATASETS = ("cifar10", "cifar100", "food101", "sun397", "cars196", "dtd", "oxford_iiit_pet",
                     "caltech101", "oxford_flowers102")

EVAL_SETTINGS = (
    Setting("checkpoint", "string", "",
            "evaluate/export: checkpoint prefix (default: the newest in --model_dir)."),
    Setting("encoder", "string", "online",
            "evaluate/export: the online backbone or the EMA target's.", choices=("online", "target")),
    Setting("saved_model", "string", "",
            "evaluate: an exported SavedModel instead of a checkpoint (results go to "
            "--model_dir/eval/)."),
    Setting("output", "string", "",
            "convert to_torch: the file to write, .pth (needs PyTorch) or .safetensors."),
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
    Setting("knn_k", "list", ["1", "20"],
            "knn: numbers of neighbours."),
    Setting("knn_vote", "string", "majority",
            "knn: majority (the paper's code) or weighted (exp(sim / T) per "
            "neighbour, T = --knn_temperature).", choices=("majority", "weighted")),
    Setting("knn_temperature", "float", 0.07,
            "knn: temperature of the weighted vote."),
    Setting("knn_search", "string", "exact",
            "knn: ScaNN brute force (exact) or tree + hashing + re-ranking (approx).", choices=("exact", "approx")),
    Setting("cache_features", "bool", True,
            "knn/linear: keep extracted features in --model_dir/eval/features/ and "
            "reuse them (a re-run with another k or vote is instant)."),
    Setting("index_split", "string", "all",
            "knn: the index is all training images, or only the labelled ones of "
            "--label_split (semi-supervised 1-NN).", choices=("all", "labelled")),
    Setting("projector_split", "string", "train",
            "projector: the split whose images are embedded (train: metadata shows training "
            "labels beside true ones).", choices=("train", "test")),
    Setting("projector_images", "integer", 2000,
            "projector: how many images (evenly spaced over the split).", minimum=1),
    Setting("projector_queries", "integer", 8,
            "projector: training images whose bank neighbours (plain and constrained) are drawn "
            "in eval/neighbours.png (0: none).", minimum=0),
    Setting("linear_epochs", "integer", 40,
            "linear: epochs (paper: 40).", minimum=1),
    Setting("linear_lr", "float", 0.01,
            "linear: SGD learning rate, momentum 0.9 (paper: 0.01)."),
    Setting("linear_milestones", "list", ["15", "30"],
            "linear: epochs after which the lr is divided by 10 (paper: "
            "15,30)."),
    Setting("linear_batch_size", "integer", 256,
            "linear: batch size (paper: 256).", minimum=1),
    Setting("linear_weight_decay", "float", 1e-4,
            "linear: SGD weight decay on weight and bias (paper: 1e-4)."),
    Setting("linear_augment", "bool", True,
            "linear: train on features of a fresh random resized crop + flip of every "
            "image every epoch (the paper's probe: one backbone pass per image per epoch); "
            "--nolinear_augment: on cached centre-crop features (fast, not the paper's)."),
    Setting("linear_crop_min_scale", "float", 0.08,
            "linear: smallest area fraction of the training crops (paper: "
            "0.08, torchvision's default)."),
    Setting("semi_epochs", "integer", 20,
            "semi: epochs of head training on the labelled subset (paper: 20).", minimum=1),
    Setting("semi_lr", "float", 0.001,
            "semi: SGD learning rate, momentum 0.9 (paper: 0.001)."),
    Setting("semi_milestones", "list", ["15", "35", "50"],
            "semi: epochs after which the lr is divided by 10 (paper: "
            "15,35,50, of which 20 epochs reach 15)."),
    Setting("semi_batch_size", "integer", 256,
            "semi: batch size (paper: 256).", minimum=1),
    Setting("semi_weight_decay", "float", 1e-4,
            "semi: SGD weight decay on every head parameter (paper: 1e-4)."),
    Setting("semi_crop_min_scale", "float", 0.08,
            "semi: smallest area fraction of the training crops (paper: 0.08)."),
    Setting("finetune_epochs", "integer", 20,
            "finetune: epochs of full fine-tuning (backbone and head; not the "
            "paper's semi-supervised protocol, which is `semi`).", minimum=1),
    Setting("finetune_lr", "float", 0.001,
            "finetune: backbone learning rate, cosine decay."),
    Setting("finetune_head_lr", "float", 0.01,
            "finetune: learning rate of the new linear head."),
    Setting("finetune_batch_size", "integer", 256,
            "finetune: batch size.", minimum=1),
    Setting("finetune_weight_decay", "float", 0.0,
            "finetune: L2 penalty on every weight."),
    Setting("finetune_crop_min_scale", "float", 0.08,
            "finetune: smallest area fraction of the random resized crops "
            "(0.08: the supervised ImageNet setting; small images need more, e.g. 0.5 at 28 px)."),
    Setting("transfer_datasets", "list", list(TRANSFER_DATASETS),
            "transfer: TFDS names, or folder:PATH / tfrecord:PATH."),
    Setting("transfer_data_dir", "string", "",
            "transfer: TFDS data dir of the transfer data sets."),
    Setting("transfer_l2", "list", ["0", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"],
            "transfer: L2 strengths tried."),
    Setting("transfer_val_fraction", "float", 0.2,
            "transfer: part of each training set held out to choose the L2."),
    Setting("transfer_max_iter", "integer", 1000,
            "transfer: L-BFGS iterations at most per fit (it stops earlier "
            "once the largest gradient entry is below 1e-6).", minimum=1),
)


_EVAL = {s.name: s for s in EVAL_SETTINGS}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    protocol: str
    model_dir: str
    checkpoint: str
    encoder: str
    saved_model: str
    dataset: object  # None: the run's (flags.json)
    data_dir: object
    class_list: object
    label_split: object
    image_size: object  # None: the model's
    seed: int
    eval_batch_size: int
    knn_k: tuple
    knn_vote: str
    knn_temperature: float
    knn_search: str
    cache_features: bool
    index_split: str
    projector_split: str
    projector_images: int
    projector_queries: int
    linear_epochs: int
    linear_lr: float
    linear_milestones: tuple
    linear_batch_size: int
    linear_weight_decay: float
    linear_augment: bool
    linear_crop_min_scale: float
    semi_epochs: int
    semi_lr: float
    semi_milestones: tuple
    semi_batch_size: int
    semi_weight_decay: float
    semi_crop_min_scale: float
    finetune_epochs: int
    finetune_lr: float
    finetune_head_lr: float
    finetune_batch_size: int
    finetune_weight_decay: float
    finetune_crop_min_scale: float
    transfer_datasets: tuple
    transfer_data_dir: str
    transfer_l2: tuple
    transfer_val_fraction: float
    transfer_max_iter: int

    def to_dict(self):
        return dataclasses.asdict(self)


def _ints(name, values, minimum):
    try:
        out = tuple(int(v) for v in values)
    except ValueError:
        raise UsageError(f"--{name} must be a comma-separated list of integers (got {','.join(values)})") from None
    if not out or min(out) < minimum:
        raise UsageError(f"--{name} values must be at least {minimum} (got {','.join(values)})")
    return out


def eval_from_flags(protocol):
    """The validated EvalConfig of `python -m cmsf_tf.evaluate PROTOCOL --flags`. Data flags not given
    on the command line are None: the run's own (flags.json) apply."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    given = lambda name: FLAGS[name].value if FLAGS[name].present else None  # noqa: E731
    try:
        l2 = tuple(float(v) for v in FLAGS.transfer_l2)
    except ValueError:
        raise UsageError(f"--transfer_l2 must be a list of numbers (got {','.join(FLAGS.transfer_l2)})") from None
    cfg = EvalConfig(
        protocol=protocol, model_dir=FLAGS.model_dir, checkpoint=FLAGS.checkpoint, encoder=FLAGS.encoder,
        saved_model=FLAGS.saved_model, dataset=given("dataset"), data_dir=given("data_dir"),
        class_list=given("class_list"), label_split=given("label_split"), image_size=given("image_size"),
        seed=FLAGS.seed, eval_batch_size=FLAGS.eval_batch_size,
        knn_k=_ints("knn_k", FLAGS.knn_k, 1), knn_vote=FLAGS.knn_vote, knn_temperature=FLAGS.knn_temperature,
        knn_search=FLAGS.knn_search, cache_features=FLAGS.cache_features, index_split=FLAGS.index_split,
        projector_split=FLAGS.projector_split, projector_images=FLAGS.projector_images,
        projector_queries=FLAGS.projector_queries,
        linear_epochs=FLAGS.linear_epochs, linear_lr=FLAGS.linear_lr,
        linear_milestones=_ints("linear_milestones", FLAGS.linear_milestones, 0) if FLAGS.linear_milestones else (),
        linear_batch_size=FLAGS.linear_batch_size, linear_weight_decay=FLAGS.linear_weight_decay,
        linear_augment=FLAGS.linear_augment, linear_crop_min_scale=FLAGS.linear_crop_min_scale,
        semi_epochs=FLAGS.semi_epochs, semi_lr=FLAGS.semi_lr,
        semi_milestones=_ints("semi_milestones", FLAGS.semi_milestones, 0) if FLAGS.semi_milestones else (),
        semi_batch_size=FLAGS.semi_batch_size, semi_weight_decay=FLAGS.semi_weight_decay,
        semi_crop_min_scale=FLAGS.semi_crop_min_scale, finetune_epochs=FLAGS.finetune_epochs, finetune_lr=FLAGS.finetune_lr,
        finetune_head_lr=FLAGS.finetune_head_lr, finetune_batch_size=FLAGS.finetune_batch_size,
        finetune_weight_decay=FLAGS.finetune_weight_decay, finetune_crop_min_scale=FLAGS.finetune_crop_min_scale,
        transfer_datasets=tuple(FLAGS.transfer_datasets),
        transfer_data_dir=FLAGS.transfer_data_dir, transfer_l2=l2, transfer_val_fraction=FLAGS.transfer_val_fraction,
        transfer_max_iter=FLAGS.transfer_max_iter)
    _finite(cfg)
    for setting in EVAL_SETTINGS + (_TRAIN["eval_batch_size"],):  # each setting's own rule from its row
        if setting.kind != "list" and setting.name in EvalConfig.__dataclass_fields__:  # export_dir: export's
            setting.check(getattr(cfg, setting.name))
    for name in ("linear_lr", "semi_lr", "finetune_lr", "finetune_head_lr", "knn_temperature"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{name} must be positive (got {getattr(cfg, name)})")
    for name in ("linear_weight_decay", "semi_weight_decay", "finetune_weight_decay"):
        if not getattr(cfg, name) >= 0:
            raise UsageError(f"--{name} must not be negative (got {getattr(cfg, name)})")
    for name in ("linear_crop_min_scale", "semi_crop_min_scale", "finetune_crop_min_scale"):
        if not 0 < getattr(cfg, name) <= 1:
            raise UsageError(f"--{name} must be in (0, 1] (got {getattr(cfg, name)})")
    if not 0 < cfg.transfer_val_fraction < 1:
        raise UsageError(f"--transfer_val_fraction must be in (0, 1) (got {cfg.transfer_val_fraction})")
    if cfg.dataset is not None and not sources.is_known(cfg.dataset):
        raise UsageError(f"unknown --dataset {cfg.dataset!r}; choose one of: {', '.join(sources.DATASETS)}")
    if cfg.label_split:
        label_split_percent(cfg.label_split)
    if cfg.saved_model and cfg.checkpoint:
        raise UsageError("give --saved_model or --checkpoint, not both")
    if cfg.saved_model and cfg.protocol in ("finetune", "semi"):
        raise UsageError(f"{cfg.protocol} needs a training checkpoint (--model_dir of a run), not a SavedModel")
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

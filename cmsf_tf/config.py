"""The only place absl FLAGS are defined and read.

`from_flags()` validates every flag at start-up and returns a frozen `Config`; library code takes plain
arguments from it. Any problem is raised as `UsageError` with one sentence for the user.
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


_METHODS = ("byol", "msf", "cmsf_2q", "cmsf_km", "cmsf_sup", "cmsf_pseudo", "xent")  # checked against cmsf_tf.methods.METHODS by the tests
_ARCHS = ("resnet50", "resnet18", "resnet18_small")
_STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_PRECISIONS = ("float32", "bfloat16", "float16")

flags.DEFINE_string("method", "msf", f"Training method: {', '.join(_METHODS)}.")
flags.DEFINE_string("dataset", "fashion_mnist", f"Data set: {', '.join(sources.DATASETS)}.")
flags.DEFINE_string("data_dir", "", "Directory of the data set (default: the data set's usual place).")
flags.DEFINE_string("class_list", "", "--dataset=folder: only these class folders (imagenet100: the CMSF code's "
                    "subset; imagenet100_cmc: CMC's; or a file of folder names, one per line).")
flags.DEFINE_float("max_corrupt_fraction", 0.001, "--dataset=folder: corrupt images are skipped and reported; "
                   "more than this fraction of a split is an error.")
flags.DEFINE_integer("shuffle_buffer", 10000, "Shuffle buffer of record sources (tfrecord, streamed TFDS).")
flags.DEFINE_string("model_dir", None, "Where the run writes flags.json, checkpoints/, tensorboard/, result.json.")
flags.DEFINE_string("arch", "resnet50", f"Backbone: {', '.join(_ARCHS)} (resnet18_small: 3x3 stem for 28-64 px).")
flags.DEFINE_integer("width", 64, "Channels of the first ResNet stage (64 = standard; smaller for CPU demos).")
flags.DEFINE_integer("image_size", 224, "Side of the training and evaluation crops, in pixels.")
flags.DEFINE_integer("epochs", 200, "Training epochs.")
flags.DEFINE_integer("batch_size", 256, "Global batch size (over all replicas).")
flags.DEFINE_float("learning_rate", 0.05, "Peak SGD learning rate (used as given; not rescaled by batch size).")
flags.DEFINE_integer("warmup_epochs", 0, "Linear learning-rate warm-up before the cosine decay.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 1e-4, "L2 penalty on every weight (PyTorch SGD weight_decay semantics).")
flags.DEFINE_float("ema_momentum", 0.99, "Target network EMA momentum m: target = m*target + (1-m)*online.")
flags.DEFINE_integer("bank_size", 128000, "Rows of the memory bank; a multiple of --batch_size.")
flags.DEFINE_integer("topk", 5, "Neighbours the query is pulled towards (byol uses 1).")
flags.DEFINE_integer("topk_prime", 5, "cmsf_2q: neighbours k' of the previous view that form the constraint set.")
flags.DEFINE_string("cmsf_2q_view", "pool", "cmsf_2q: where t' comes from: pool (each image's previous target, "
                    "kept per image) or third (a third augmentation through the target every step: one more "
                    "target forward pass per image, no pool memory).")
flags.DEFINE_string("pool_dtype", "float32", "cmsf_2q/cmsf_km per-image pool: float32 or bfloat16 (half the "
                    "memory; ImageNet x 512: 2Q 5.2 / 2.6 GB, KM 2.6 / 1.3 GB per replica).")
flags.DEFINE_string("constraint_fill", "nearest", "cmsf_sup/cmsf_km/cmsf_pseudo: when fewer than --topk bank rows "
                    "satisfy the constraint, fill with the query's nearest other rows (nearest) or with arbitrary "
                    "rows as the paper's code does (official: every other row at distance 5.0, ties).")
flags.DEFINE_integer("num_clusters", 50000, "cmsf_km: k-means clusters (paper: 50,000 on ImageNet).")
flags.DEFINE_integer("kmeans_iters", 20, "cmsf_km: k-means iterations per epoch end.")
flags.DEFINE_string("kmeans_init", "random", "cmsf_km: random or kmeans++ (greedy k-means++: better clusters, "
                    "k sequential passes over the pool; too slow for 50,000 clusters of ImageNet).")
flags.DEFINE_float("conf_threshold", 0.85, "cmsf_pseudo: smallest pseudo-label probability that constrains an "
                   "unlabelled query (below it: plain MSF neighbours).")
flags.DEFINE_integer("sup_bank_size", 128000, "cmsf_pseudo: rows of the cache of labelled target embeddings the "
                     "pseudo-label head trains on.")
flags.DEFINE_bool("pseudo_cache_confident", False, "cmsf_pseudo: also cache confidently pseudo-labelled images.")
flags.DEFINE_integer("pseudo_epochs", 10, "cmsf_pseudo: passes over the cache per head-training round (a round at "
                     "the middle and at the end of every epoch).")
flags.DEFINE_float("pseudo_lr", 0.01, "cmsf_pseudo: SGD learning rate of the head (momentum 0.9; paper: 0.01).")
flags.DEFINE_float("pseudo_weight_decay", 1e-4, "cmsf_pseudo: weight decay of the head's SGD (paper: 1e-4).")
flags.DEFINE_list("pseudo_milestones", ["15", "30", "40"], "cmsf_pseudo: passes after which the head's lr is divided "
                  "by 10 (the paper's code: 15,30,40, which 10 passes never reach, so the lr stays constant).")
flags.DEFINE_integer("pseudo_batch_size", 256, "cmsf_pseudo: batch size of head training.")
flags.DEFINE_float("label_smoothing", 0.0, "xent: label smoothing of the cross-entropy targets.")
flags.DEFINE_float("crop_min_scale", 0.2, "Smallest area fraction of the random resized crops (paper: 0.2).")
flags.DEFINE_float("blur_prob", 0.5, "Probability of Gaussian blur in the strong view (paper: 0.5 at 224 px).")
flags.DEFINE_string("label_split", "", "Labelled subset: percent:P (class-stratified, seeded by --seed), "
                    "imagenet_1percent / imagenet_10percent (the paper's ImageNet lists, shipped), or a file of "
                    "image names (tools/make_label_split.py); the other training images get label -1. Empty: every "
                    "image is labelled.")
flags.DEFINE_float("label_noise", 0.0, "Percent of training labels replaced by another class (seeded by --seed).")
flags.DEFINE_string("label_noise_file", "", "A corruption list instead: lines '<image name> <label>' that replace "
                    "those images' training labels; the paper's lists ('<class dir>/<file name> <class index>' for "
                    "every training image) are read as they are.")
flags.DEFINE_integer("proj_hidden", 0, "Hidden width of projector and predictor (0: 2 x backbone features).")
flags.DEFINE_integer("proj_dim", 0, "Embedding dimension (0: backbone features / 4, i.e. 512 for ResNet-50).")
flags.DEFINE_string("strategy", "default", f"tf.distribute strategy: {', '.join(_STRATEGIES)}.")
flags.DEFINE_integer("cpu_devices", 1, "With --strategy=mirrored and no GPU: logical CPU devices to mirror over.")
flags.DEFINE_string("tpu", "", "TPU name or address for --strategy=tpu.")
flags.DEFINE_string("mixed_precision", "float32", f"Compute dtype policy: {', '.join(_PRECISIONS)}.")
flags.DEFINE_integer("seed", 0, "Seed of weights, data order and augmentations.")
flags.DEFINE_integer("steps_per_epoch", 0, "Cap on steps per epoch (0: the whole training set), for smoke runs.")
flags.DEFINE_integer("checkpoint_steps", 500, "Also checkpoint every this many steps (0: only at epoch ends).")
flags.DEFINE_integer("stop_after_steps", 0, "Stop (resumably) once this many global steps are done (0: never).")
flags.DEFINE_integer("log_steps", 50, "Write step-level TensorBoard scalars every this many steps.")
flags.DEFINE_bool("deterministic", False, "Deterministic TF ops (bit-exact resume checks; slower).")
flags.DEFINE_bool("knn_eval", True, "Evaluate 1-NN and 20-NN on the test split at the end into result.json.")
flags.DEFINE_bool("knn_baselines", False, "Also report k-NN of the untrained network and of raw pixels.")
flags.DEFINE_integer("eval_batch_size", 512, "Batch size of feature extraction.")
flags.DEFINE_integer("knn_every", 0, "Every this many epochs (and after the last), 1-NN and 20-NN top-1 of the online "
                     "backbone on a fixed subset of the test split, into TensorBoard eval/knn_* and "
                     "knn_curve.jsonl (0: never).")
flags.DEFINE_integer("knn_every_queries", 2000, "--knn_every: test images evaluated (evenly spaced; 0: all).")
flags.DEFINE_integer("knn_every_index", 0, "--knn_every: training images in the index (evenly spaced; 0: all).")
flags.mark_flag_as_required("model_dir")

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Config:
    method: str
    dataset: str
    data_dir: str
    class_list: str
    max_corrupt_fraction: float
    shuffle_buffer: int
    model_dir: str
    arch: str
    width: int
    image_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    warmup_epochs: int
    momentum: float
    weight_decay: float
    ema_momentum: float
    bank_size: int
    topk: int
    topk_prime: int
    cmsf_2q_view: str
    constraint_fill: str
    pool_dtype: str
    num_clusters: int
    kmeans_iters: int
    kmeans_init: str
    conf_threshold: float
    sup_bank_size: int
    pseudo_cache_confident: bool
    pseudo_epochs: int
    pseudo_lr: float
    pseudo_weight_decay: float
    pseudo_milestones: tuple
    pseudo_batch_size: int
    label_smoothing: float
    crop_min_scale: float
    label_split: str
    label_noise: float
    label_noise_file: str
    blur_prob: float
    proj_hidden: int
    proj_dim: int
    strategy: str
    cpu_devices: int
    tpu: str
    mixed_precision: str
    seed: int
    steps_per_epoch: int
    checkpoint_steps: int
    stop_after_steps: int
    log_steps: int
    deterministic: bool
    knn_eval: bool
    knn_baselines: bool
    eval_batch_size: int
    knn_every: int
    knn_every_queries: int
    knn_every_index: int

    def to_dict(self):
        return dataclasses.asdict(self)


def _flag_value(name, value):
    return tuple(value) if name == "pseudo_milestones" else value


def from_flags():
    cfg = Config(**{f.name: _flag_value(f.name, FLAGS[f.name].value) for f in dataclasses.fields(Config)})
    validate(cfg)
    return cfg


def make(**values):
    """A validated Config from the flags' defaults and `values`: the programmatic way to describe a run."""
    unknown = set(values) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UsageError(f"unknown settings: {', '.join(sorted(unknown))}")
    cfg = Config(**{f.name: _flag_value(f.name, values.get(f.name, FLAGS[f.name].default))
                    for f in dataclasses.fields(Config)})
    validate(cfg)
    return cfg


def _choice(value, name, choices):
    if value not in choices:
        raise UsageError(f"unknown --{name} {value!r}; choose one of: {', '.join(choices)}")


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
    _choice(cfg.method, "method", _METHODS)
    _choice(cfg.arch, "arch", _ARCHS)
    if not sources.is_known(cfg.dataset):
        raise UsageError(f"unknown --dataset {cfg.dataset!r}; choose one of: {', '.join(sources.DATASETS)}")
    _choice(cfg.strategy, "strategy", _STRATEGIES)
    _choice(cfg.mixed_precision, "mixed_precision", _PRECISIONS)
    _choice(cfg.cmsf_2q_view, "cmsf_2q_view", ("pool", "third"))
    _choice(cfg.constraint_fill, "constraint_fill", ("nearest", "official"))
    _choice(cfg.pool_dtype, "pool_dtype", ("float32", "bfloat16"))
    _choice(cfg.kmeans_init, "kmeans_init", ("random", "kmeans++"))
    for name in ("epochs", "batch_size", "bank_size", "topk", "image_size", "width", "cpu_devices",
                 "eval_batch_size", "shuffle_buffer", "topk_prime", "num_clusters", "kmeans_iters"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("steps_per_epoch", "checkpoint_steps", "stop_after_steps", "log_steps", "warmup_epochs",
                 "proj_hidden", "proj_dim", "knn_every", "knn_every_queries", "knn_every_index"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must not be negative (got {getattr(cfg, name)})")
    if not cfg.learning_rate > 0:
        raise UsageError(f"--learning_rate must be positive (got {cfg.learning_rate})")
    if cfg.method == "cmsf_pseudo":
        if not cfg.label_split:
            raise UsageError("--method=cmsf_pseudo needs --label_split (with every image labelled, use cmsf_sup)")
        if not 0 < cfg.conf_threshold <= 1:
            raise UsageError(f"--conf_threshold must be in (0, 1] (got {cfg.conf_threshold})")
        if cfg.sup_bank_size < cfg.batch_size:
            raise UsageError(f"--sup_bank_size {cfg.sup_bank_size} is smaller than the global --batch_size "
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


# ----- python -m cmsf_tf.evaluate / python -m cmsf_tf.export -----
PROTOCOLS = ("knn", "linear", "semi", "finetune", "transfer")
# The paper's transfer data sets that TFDS has (FGVC Aircraft is not in TFDS: add it as folder:PATH).
TRANSFER_DATASETS = ("cifar10", "cifar100", "food101", "sun397", "cars196", "dtd", "oxford_iiit_pet",
                     "caltech101", "oxford_flowers102")

flags.DEFINE_string("checkpoint", "", "evaluate/export: checkpoint prefix (default: the newest in --model_dir).")
flags.DEFINE_string("encoder", "online", "evaluate/export: the online backbone or the EMA target's.")
flags.DEFINE_string("saved_model", "", "evaluate: an exported SavedModel instead of a checkpoint (results go to "
                    "--model_dir/eval/).")
flags.DEFINE_string("export_dir", "", "export: the SavedModel directory to write.")
flags.DEFINE_list("knn_k", ["1", "20"], "knn: numbers of neighbours.")
flags.DEFINE_string("knn_vote", "majority", "knn: majority (the paper's code) or weighted (exp(sim / T) per "
                    "neighbour, T = --knn_temperature).")
flags.DEFINE_float("knn_temperature", 0.07, "knn: temperature of the weighted vote.")
flags.DEFINE_string("knn_search", "exact", "knn: ScaNN brute force (exact) or tree + hashing + re-ranking (approx).")
flags.DEFINE_bool("cache_features", True, "knn/linear: keep extracted features in --model_dir/eval/features/ and "
                  "reuse them (a re-run with another k or vote is instant).")
flags.DEFINE_string("index_split", "all", "knn: the index is all training images, or only the labelled ones of "
                    "--label_split (semi-supervised 1-NN).")
flags.DEFINE_integer("linear_epochs", 40, "linear: epochs (paper: 40).")
flags.DEFINE_float("linear_lr", 0.01, "linear: SGD learning rate, momentum 0.9 (paper: 0.01).")
flags.DEFINE_list("linear_milestones", ["15", "30"], "linear: epochs after which the lr is divided by 10 (paper: "
                  "15,30).")
flags.DEFINE_integer("linear_batch_size", 256, "linear: batch size (paper: 256).")
flags.DEFINE_float("linear_weight_decay", 1e-4, "linear: SGD weight decay on weight and bias (paper: 1e-4).")
flags.DEFINE_bool("linear_augment", True, "linear: train on features of a fresh random resized crop + flip of every "
                  "image every epoch (the paper's probe: one backbone pass per image per epoch); "
                  "--nolinear_augment: on cached centre-crop features (fast, not the paper's).")
flags.DEFINE_float("linear_crop_min_scale", 0.08, "linear: smallest area fraction of the training crops (paper: "
                   "0.08, torchvision's default).")
flags.DEFINE_integer("semi_epochs", 20, "semi: epochs of head training on the labelled subset (paper: 20).")
flags.DEFINE_float("semi_lr", 0.001, "semi: SGD learning rate, momentum 0.9 (paper: 0.001).")
flags.DEFINE_list("semi_milestones", ["15", "35", "50"], "semi: epochs after which the lr is divided by 10 (paper: "
                  "15,35,50, of which 20 epochs reach 15).")
flags.DEFINE_integer("semi_batch_size", 256, "semi: batch size (paper: 256).")
flags.DEFINE_float("semi_weight_decay", 1e-4, "semi: SGD weight decay on every head parameter (paper: 1e-4).")
flags.DEFINE_float("semi_crop_min_scale", 0.08, "semi: smallest area fraction of the training crops (paper: 0.08).")
flags.DEFINE_integer("finetune_epochs", 20, "finetune: epochs of full fine-tuning (backbone and head; not the "
                     "paper's semi-supervised protocol, which is `semi`).")
flags.DEFINE_float("finetune_lr", 0.001, "finetune: backbone learning rate, cosine decay.")
flags.DEFINE_float("finetune_head_lr", 0.01, "finetune: learning rate of the new linear head.")
flags.DEFINE_integer("finetune_batch_size", 256, "finetune: batch size.")
flags.DEFINE_float("finetune_weight_decay", 0.0, "finetune: L2 penalty on every weight.")
flags.DEFINE_float("finetune_crop_min_scale", 0.08, "finetune: smallest area fraction of the random resized crops "
                   "(0.08: the supervised ImageNet setting; small images need more, e.g. 0.5 at 28 px).")
flags.DEFINE_list("transfer_datasets", list(TRANSFER_DATASETS), "transfer: TFDS names, or folder:PATH / tfrecord:PATH.")
flags.DEFINE_string("transfer_data_dir", "", "transfer: TFDS data dir of the transfer data sets.")
flags.DEFINE_list("transfer_l2", ["0", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"], "transfer: L2 strengths tried.")
flags.DEFINE_float("transfer_val_fraction", 0.2, "transfer: part of each training set held out to choose the L2.")
flags.DEFINE_integer("transfer_max_iter", 1000, "transfer: L-BFGS iterations at most per fit (it stops earlier "
                     "once the largest gradient entry is below 1e-6).")


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
    _choice(cfg.encoder, "encoder", ("online", "target"))
    _choice(cfg.knn_vote, "knn_vote", ("majority", "weighted"))
    _choice(cfg.knn_search, "knn_search", ("exact", "approx"))
    _choice(cfg.index_split, "index_split", ("all", "labelled"))
    for name in ("linear_epochs", "linear_batch_size", "semi_epochs", "semi_batch_size", "finetune_epochs",
                 "finetune_batch_size", "eval_batch_size", "transfer_max_iter"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
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


def export_from_flags():
    cfg = ExportConfig(FLAGS.model_dir, FLAGS.checkpoint, FLAGS.encoder, FLAGS.export_dir)
    _choice(cfg.encoder, "encoder", ("online", "target"))
    if not cfg.export_dir:
        raise UsageError("--export_dir is required: where to write the SavedModel")
    return cfg

"""--method name -> model class (MeanShift subclasses, and the cross-entropy baseline), with each
method's own settings and checks.

The registry itself loads no TensorFlow: `NAMES`, `own_settings()` and `check(cfg)` serve the command
line, which refuses bad flags before TensorFlow starts; `METHODS[name]` imports the method's module on
first use. A new method is its module (a MeanShift subclass with its hooks) and one `register(...)` call
here, naming the settings only it reads (settings several methods read are cmsf_tf.config's).
"""

import collections.abc
import dataclasses
import importlib

from cmsf_tf.errors import UserError
from cmsf_tf.settings import FRACTION, NOT_NEGATIVE, POSITIVE, BELOW_ONE, Setting, integers


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    target: str  # "module:Class"
    settings: tuple = ()  # the Setting rows only this method reads
    check: object = None  # cfg -> None, raising UserError: checks across settings, for this method's runs

    def load(self):
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


_REGISTRY = {}


def register(name, target, settings=(), check=None):
    _REGISTRY[name] = Method(name, target, tuple(settings), check)


class _Classes(collections.abc.Mapping):
    """name -> model class, each imported when first asked for."""

    def __getitem__(self, name):
        return _REGISTRY[name].load()

    def __iter__(self):
        return iter(_REGISTRY)

    def __len__(self):
        return len(_REGISTRY)


METHODS = _Classes()


def names():
    return tuple(_REGISTRY)


def own_settings():
    """Every method's own rows, in registration order."""
    return tuple(row for method in _REGISTRY.values() for row in method.settings)


def check(cfg):
    """The checks of cfg.method across its settings (each row's own rule is checked by cmsf_tf.config)."""
    method = _REGISTRY[cfg.method]
    if method.check is not None:
        method.check(cfg)


# ----- the methods -----
register("byol", "cmsf_tf.methods.byol:BYOL")
register("msf", "cmsf_tf.methods.msf:MSF")
register("cmsf_sup", "cmsf_tf.methods.cmsf_sup:CMSFSup")


def _check_cmsf_2q(cfg):
    if cfg.topk_prime < cfg.topk:
        raise UserError(f"--topk_prime {cfg.topk_prime} must be at least --topk {cfg.topk} (the constrained "
                        "neighbours are chosen among the k' candidates)")


register("cmsf_2q", "cmsf_tf.methods.cmsf_2q:CMSF2Q", check=_check_cmsf_2q, settings=(
    Setting("topk_prime", "integer", 5,
            "cmsf_2q: neighbours k' of the previous view that form the constraint set.", minimum=1, identity=True),
    Setting("cmsf_2q_view", "string", "pool",
            "cmsf_2q: where t' comes from: pool (each image's previous target, "
            "kept per image) or third (a third augmentation through the target every step: one more "
            "target forward pass per image, no pool memory).", choices=("pool", "third"), identity=True),
))
register("cmsf_km", "cmsf_tf.methods.cmsf_km:CMSFKM", settings=(
    Setting("num_clusters", "integer", 50000,
            "cmsf_km: k-means clusters (paper: 50,000 on ImageNet).", minimum=1, identity=True),
    Setting("kmeans_iters", "integer", 20,
            "cmsf_km: k-means iterations per epoch end.", minimum=1),
    Setting("kmeans_init", "string", "random",
            "cmsf_km: random or kmeans++ (greedy k-means++: better clusters, "
            "k sequential passes over the pool; too slow for 50,000 clusters of ImageNet).", choices=("random", "kmeans++")),
))


def _check_cmsf_pseudo(cfg):
    if not cfg.label_split:
        raise UserError("--method=cmsf_pseudo needs --label_split (with every image labelled, use cmsf_sup)")
    if cfg.labelled_cache_size < cfg.batch_size:
        raise UserError(f"--labelled_cache_size {cfg.labelled_cache_size} is smaller than the global --batch_size "
                        f"{cfg.batch_size}; one batch must fit in the cache")
    integers(0)("pseudo_milestones", cfg.pseudo_milestones)


register("cmsf_pseudo", "cmsf_tf.methods.cmsf_pseudo:CMSFPseudo", check=_check_cmsf_pseudo, settings=(
    Setting("conf_threshold", "float", 0.85,
            "cmsf_pseudo: smallest pseudo-label probability that constrains an "
            "unlabelled query (below it: plain MSF neighbours).", identity=True, rule=FRACTION),
    Setting("labelled_cache_size", "integer", 128000,
            "cmsf_pseudo: rows of the LabelledCache, the ring of labelled target embeddings the "
            "pseudo-label head trains on (the official code's --sup_mem_bank_size; formerly "
            "--sup_bank_size, still accepted).", identity=True),
    Setting("pseudo_cache_confident", "bool", False,
            "cmsf_pseudo: also cache confidently pseudo-labelled images."),
    Setting("pseudo_epochs", "integer", 10,
            "cmsf_pseudo: passes over the cache per head-training round (a round at "
            "the middle and at the end of every epoch).", minimum=1),
    Setting("pseudo_lr", "float", 0.01,
            "cmsf_pseudo: SGD learning rate of the head (momentum 0.9; paper: 0.01).", rule=POSITIVE),
    Setting("pseudo_weight_decay", "float", 1e-4,
            "cmsf_pseudo: weight decay of the head's SGD (paper: 1e-4).", rule=NOT_NEGATIVE),
    Setting("pseudo_milestones", "list", ["15", "30", "40"],
            "cmsf_pseudo: passes after which the head's lr is divided "
            "by 10 (the paper's code: 15,30,40, which 10 passes never reach, so the lr stays constant)."),
    Setting("pseudo_batch_size", "integer", 256,
            "cmsf_pseudo: batch size of head training.", minimum=1),
))


def _check_xent(cfg):
    if cfg.multi_crop:
        raise UserError("--multi_crop adds queries to the mean-shift methods; --method=xent has none")


register("xent", "cmsf_tf.methods.xent:CrossEntropy", check=_check_xent, settings=(
    Setting("label_smoothing", "float", 0.0,
            "xent: label smoothing of the cross-entropy targets.", identity=True, rule=BELOW_ONE),
))

"""Label subsets and label noise, as pure NumPy functions of (labels, percent, seed).

Both are keyed by the stable dataset index, so the same flags give the same split and the same noise on
every worker and in every resumed run. The true labels are never changed: callers keep them for
monitoring (purity, pseudo-label accuracy) only.
"""

import os

import numpy as np

from cmsf_tf.data.sources import image_name

UNLABELLED = -1
# The paper's ImageNet label splits, shipped with the package (official/README.md): --label_split=NAME.
_OFFICIAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official")
NAMED_SPLITS = {"imagenet_1percent": os.path.join(_OFFICIAL, "imagenet_1percent.txt"),
                "imagenet_10percent": os.path.join(_OFFICIAL, "imagenet_10percent.txt")}


def split_path(label_split):
    """The file of a --label_split: a shipped list's path for its name, else the value itself."""
    return NAMED_SPLITS.get(label_split, label_split)


def _quotas(counts, total):
    """Integer per-class quotas proportional to `counts` that add up to exactly `total`
    (largest-remainder rounding)."""
    exact = counts * (total / counts.sum())
    quotas = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: total - quotas.sum()]] += 1
    return quotas


def percent_split(labels, percent, seed):
    """bool[N]: a class-stratified random subset of exactly round(N * percent / 100) examples."""
    labels = np.asarray(labels)
    if not 0 < percent <= 100:
        raise ValueError(f"a label split must keep between 0 and 100 percent (got {percent})")
    total = int(round(len(labels) * percent / 100.0))
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng([seed, 0x5EED])
    keep = np.zeros(len(labels), bool)
    for cls, quota in zip(classes, _quotas(counts, total)):
        members = np.flatnonzero(labels == cls)
        keep[rng.choice(members, size=quota, replace=False)] = True
    return keep


def random_split(num_examples, percent, seed):
    """bool[N]: exactly round(N * percent / 100) examples, not stratified (for sources whose labels are
    only known while streaming)."""
    if not 0 < percent <= 100:
        raise ValueError(f"a label split must keep between 0 and 100 percent (got {percent})")
    keep = np.zeros(num_examples, bool)
    rng = np.random.default_rng([seed, 0x5EED])
    keep[rng.choice(num_examples, size=int(round(num_examples * percent / 100.0)), replace=False)] = True
    return keep


def read_names(path):
    """Image names of a label-split file: one per line (the official 1% / 10% ImageNet lists), or the
    first field of a whitespace-separated line; '#' lines are comments. A UTF-8 byte-order mark is
    ignored (files saved by Windows editors)."""
    with open(split_path(path), encoding="utf-8-sig") as f:
        return [line.split()[0] for line in f if line.strip() and not line.lstrip().startswith("#")]


def names_split(all_names, split_names):
    """bool[N]: the examples whose name is listed. Names are compared by file name without directories
    or extension ("n01440764_10026", as in the official 1% / 10% ImageNet lists)."""
    index = {image_name(n): i for i, n in enumerate(all_names)}
    wanted = [image_name(n) for n in split_names if n.strip()]
    unknown = [n for n in wanted if n not in index]
    if unknown:
        shown = ", ".join(unknown[:5])
        raise ValueError(f"the label split names {len(unknown)} images that are not in the data set "
                         f"(first: {shown})")
    keep = np.zeros(len(all_names), bool)
    keep[[index[n] for n in wanted]] = True
    return keep


def training_labels(labels, labelled):
    """int32[N]: the label where `labelled`, UNLABELLED elsewhere."""
    return np.where(labelled, np.asarray(labels), UNLABELLED).astype(np.int32)


def noise_shift(num_examples, percent, num_classes, seed):
    """int32[N]: 0 for clean examples; for exactly round(N * percent / 100) of them a shift in 1..C-1.
    (label + shift) mod C always lands on another class, uniformly, and needs no labels up front."""
    if not 0 <= percent < 100:
        raise ValueError(f"--label_noise must be in [0, 100) (got {percent})")
    if num_classes < 2 and percent > 0:
        raise ValueError("label noise needs at least two classes")
    rng = np.random.default_rng([seed, 0x401_5E])
    count = int(round(num_examples * percent / 100.0))
    flipped = rng.choice(num_examples, size=count, replace=False)
    shift = np.zeros(num_examples, np.int32)
    shift[flipped] = rng.integers(1, num_classes, size=count)
    return shift


def noisy_labels(labels, percent, num_classes, seed):
    """int32[N]: exactly round(N * percent / 100) labels replaced by a different class drawn uniformly."""
    labels = np.asarray(labels, np.int32)
    return (labels + noise_shift(len(labels), percent, num_classes, seed)) % num_classes


def read_corruptions(path):
    """{image name: label} of a corruption list: lines '<image name> <label>', '#' lines comments. The
    paper's lists (supervised/subsets/corrupt_*percent.txt, read by its data_loader.py) have this form
    with the path under the training root as the name, '<class dir>/<file name> <class index>', and list
    every training image; a label that differs from the folder's is a corrupted one."""
    out = {}
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise ValueError(f"line {number} of {path} is not '<image name> <label>'")
            out[image_name(fields[0])] = int(fields[1])
    return out


def corrupted_labels(labels, names, corruptions, num_classes):
    """int32[N]: `labels` with the listed images' labels replaced; unknown names or labels outside
    [0, num_classes) are errors (the first few are named)."""
    index = {image_name(n): i for i, n in enumerate(names)}
    unknown = [n for n in corruptions if n not in index]
    if unknown:
        raise ValueError(f"the corruption list names {len(unknown)} images that are not in the data set "
                         f"(first: {', '.join(unknown[:5])})")
    bad = [n for n, y in corruptions.items() if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"the corruption list gives labels outside 0..{num_classes - 1} (first: {bad[0]})")
    out = np.asarray(labels, np.int32).copy()
    out[[index[n] for n in corruptions]] = list(corruptions.values())
    return out

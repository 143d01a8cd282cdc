"""Step parity with the authors' code: our train step against theirs, transcribed to PyTorch
(tools/parity_torch.py), from the same weights, views and state, step by step.

    python tools/parity.py [--methods=msf,byol,cmsf_sup,cmsf_2q,cmsf_km,cmsf_pseudo] [--steps=5]
        [--out=results/parity] [--golden=tests/data/parity]

Both sides start from one set of weights (ours, carried to PyTorch by cmsf_tf.convert's name mapping),
take the same uint8 views from our input pipeline (normalised by our step's first op, so the float inputs
are bit-identical), the same bank (rows, labels, image indices, pointer), the same CMSF-2Q pools and M',
the same CMSF-KM cluster ids and pseudo-label head. After each step it compares the loss, the neighbour
index sets (as sets per query), the bank, pools and M', and every weight and BatchNorm statistic of the
online and target networks, and prints one table: method x quantity -> largest deviation over the steps
(|a - b| / max(1, |b|): within 1e-5 absolute or relative, whichever is looser).

Where we differ on purpose, the official behaviour is what runs here: --constraint_fill=official, a
constant learning rate (the authors' cosine is per epoch, ours per step), and a steady state in which
every image has two previous views (the authors' first-epoch CMSF-2Q uses random pool vectors) and no image
of the bank is seen again within the steps (the authors look M' up at query time, we fix it at write
time; the two agree until a row's image comes back). One difference is structural and reported by name:
PyTorch's BatchNorm keeps a moving average of the unbiased batch variance, Keras' of the biased one; the
harness also tracks the biased average on the PyTorch side (a forward hook on every BatchNorm) and checks
ours against that, and reports the gap to PyTorch's own.

With --golden it also writes the fixtures tests/test_parity.py checks our step against without torch.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

METHODS = ("msf", "byol", "cmsf_sup", "cmsf_2q", "cmsf_km", "cmsf_pseudo")
# The parity setting: small enough for a CPU in seconds, large enough that every mechanism acts (each
# class has more than k rows in the bank, the 2Q candidates are fewer than the bank, clusters are mixed).
SETUP = dict(arch="resnet18_small", width=4, image_size=16, batch_size=8, bank_size=32, topk=3, topk_prime=5,
             num_images=64, num_classes=4, learning_rate=0.05, momentum=0.9, weight_decay=1e-2, ema_momentum=0.99,
             conf_threshold=0.3, seed=0)
# Weight decay 1e-2 rather than the paper's 1e-4: its share of one step (lr x wd x w = 5e-4) must stand well
# above the tolerance for the comparison to see it. Likewise the start has a target that is not a copy of
# the online network and SGD momentum already under way (start_mid_run), so that the EMA and momentum
# terms of the very first step are large enough to check.
TOLERANCE = 1e-5
# The free-running reference: PyTorch against itself with its initial weights perturbed by this much, about
# the difference one step leaves between the two implementations (the synchronised table: ~1e-6).
PERTURBATION = 1e-6


def deviation(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


def make_data(setup=SETUP, steps=5):
    """A synthetic labelled set (structured images: a class-dependent pattern plus noise) and the first
    `steps` batches our pipeline draws from it, as NumPy."""
    from cmsf_tf.data import labels as labels_lib
    from cmsf_tf.data import pipeline, sources

    rng = np.random.RandomState(setup["seed"])
    n, size, classes = setup["num_images"], setup["image_size"], setup["num_classes"]
    true = np.arange(n) % classes
    rng.shuffle(true)
    patterns = rng.uniform(0, 255, (classes, size, size, 3))
    images = np.clip(0.6 * patterns[true] + rng.uniform(0, 102, (n, size, size, 3)), 0, 255).astype(np.uint8)
    source = sources.InMemorySource("parity", images, true.astype(np.int64), images[:8], true[:8].astype(np.int64),
                                    classes)
    train_labels = np.where(np.arange(n) % 2 == 0, true, -1).astype(np.int32)  # half labelled (pseudo)
    batches = {}
    for name, plan in (("all", None), ("half", labels_lib.LabelPlan(classes, labels=train_labels))):
        ds = pipeline.train_dataset(source, global_batch=setup["batch_size"], image_size=size, seed=setup["seed"],
                                    steps_per_epoch=steps, start_epoch=0, end_epoch=1, labels=plan, blur_prob=0.5)
        batches[name] = [{k: v.numpy() for k, v in b.items()} for b in ds.take(steps)]
    return source, batches


def initial_state(method, batches, setup=SETUP):
    """The state both sides start from, as NumPy: bank rows (unit vectors), their labels, true labels and
    image indices (images the steps do not draw), the pointer; 2Q pools with two views of every image, and M'
    = each row's previous view; KM cluster ids; all seeded."""
    rng = np.random.RandomState(setup["seed"] + 1)
    k_rows, dim = setup["bank_size"], _dim(setup)
    seen = np.unique(np.concatenate([b["index"] for b in batches]))
    unseen = np.setdiff1d(np.arange(setup["num_images"]), seen)
    unit = lambda *shape: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(rng.normal(size=shape)).astype(
        np.float32)
    state = {"bank_embeddings": unit(k_rows, dim), "bank_image_indices": rng.choice(unseen, k_rows).astype(np.int64),
             "bank_pointer": np.array(0, np.int64)}
    state["bank_true_labels"] = (np.arange(k_rows) % setup["num_classes"]).astype(np.int32)
    state["bank_labels"] = state["bank_true_labels"].copy()
    if method == "cmsf_pseudo":  # some rows of unlabelled images without a confident pseudo-label
        state["bank_labels"][rng.rand(k_rows) < 0.25] = -1
    if method == "cmsf_2q":
        state["pool"] = unit(setup["num_images"], 2, dim)  # [image, slot, dim]
        state["pool_writes"] = np.full(setup["num_images"], 2, np.int32)  # newest = slot 1, previous = slot 0
        state["previous_bank"] = state["pool"][state["bank_image_indices"], 0]
    if method == "cmsf_km":
        state["cluster_ids"] = rng.randint(0, setup["num_classes"], setup["num_images"]).astype(np.int32)
    return state


def _dim(setup):
    from cmsf_tf.models import backbones, heads

    return heads.head_dims(backbones.feature_dim(setup["arch"], setup["width"]))[1]


def config_of(method, setup=SETUP, model_dir="/tmp/parity"):
    from cmsf_tf import config

    extra = {"label_split": "percent:50", "conf_threshold": setup["conf_threshold"]} if method == "cmsf_pseudo" else {}
    return config.make(method=method, arch=setup["arch"], width=setup["width"], image_size=setup["image_size"],
                       batch_size=setup["batch_size"], bank_size=setup["bank_size"], topk=setup["topk"],
                       topk_prime=setup["topk_prime"], learning_rate=setup["learning_rate"],
                       weight_decay=setup["weight_decay"], ema_momentum=setup["ema_momentum"],
                       constraint_fill="official", num_clusters=setup["num_classes"], seed=setup["seed"],
                       model_dir=model_dir, **extra)


def build_ours(method, state, setup=SETUP, weights=None):
    """Our model for `method` in the parity setting with `state` applied; `weights` ({part: torch-named
    state dict}) replaces its initial weights (the target copies the online network)."""
    import keras

    from cmsf_tf import convert
    from cmsf_tf.methods import METHODS as OURS

    keras.utils.set_random_seed(setup["seed"])
    model = OURS[method].from_run_config(config_of(method, setup), sync_bn=False, num_images=setup["num_images"],
                                         num_classes=setup["num_classes"])
    model.compile(keras.optimizers.SGD(setup["learning_rate"], momentum=setup["momentum"]))
    if weights:
        for part, tensors in weights.items():
            convert.assign_part(getattr(model, part), part, tensors, "the golden file", part)
        model._copy_online_to_target()
    bank = model.bank
    bank.embeddings.assign(state["bank_embeddings"])
    bank.labels.assign(state["bank_labels"])
    bank.true_labels.assign(state["bank_true_labels"])
    bank.image_indices.assign(state["bank_image_indices"])
    bank.pointer.assign(state["bank_pointer"])
    if method == "cmsf_2q":
        model.pool.embeddings.assign(state["pool"].reshape(-1, state["pool"].shape[-1]))
        model.pool.writes.assign(state["pool_writes"])
        model.previous_bank.embeddings.assign(state["previous_bank"])
        model.previous_bank.image_indices.assign(state["bank_image_indices"])
    if method == "cmsf_km":
        model.cluster_ids.assign(state["cluster_ids"])
    start_mid_run(model, setup)
    return model


def start_mid_run(model, setup=SETUP):
    """Moves a new model to a state like the middle of a run, reproducibly from the seed alone (NumPy): the
    EMA target = online + N(0, 0.02) per weight, SGD velocities N(0, lr x 0.01)."""
    rng = np.random.RandomState(setup["seed"] + 2)
    for target, online in model._ema_pairs():
        target.assign(online.numpy() + 0.02 * rng.normal(size=online.shape).astype(np.float32))
    for velocity in model.optimizer.momentums:
        velocity.assign((setup["learning_rate"] * 0.01 * rng.normal(size=velocity.shape)).astype(np.float32))


def initial_weights(model):
    """{part: torch-named state dict} of the model's online network (and pseudo-label head)."""
    from cmsf_tf import convert

    parts = {part: convert.torch_state_dict(getattr(model, part), part)
             for part in ("online_backbone", "online_projector", "predictor")}
    if hasattr(model, "pseudo_head"):
        parts["pseudo_head"] = convert.torch_state_dict(model.pseudo_head, "pseudo_head")
    return parts


def our_step(model, batch):
    """One train step of ours on a NumPy batch: (loss, [sets], query labels)."""
    import tensorflow as tf

    recorded = {}
    original = model.neighbour_sets

    def recording(b, targets, sims):
        sets = original(b, targets, sims)
        recorded["sets"] = [np.asarray(s) for _, s in sets]
        recorded["query_labels"] = np.asarray(b["query_label"])
        return sets

    model.neighbour_sets = recording
    for metric in model.metrics:
        metric.reset_state()
    try:
        logs = model.train_step({k: tf.constant(v) for k, v in batch.items()})
    finally:
        del model.neighbour_sets  # back to the class's method
    return float(np.asarray(logs["loss"]).reshape(())), recorded["sets"], recorded["query_labels"]


def model_inputs(batch):
    """The normalised float32 views our step computes from the uint8 batch, NCHW for PyTorch."""
    import tensorflow as tf
    import torch

    from cmsf_tf.data import augment

    views = augment.model_views({k: tf.constant(v) for k, v in batch.items()})
    return {k: torch.from_numpy(np.transpose(views[k].numpy(), (0, 3, 1, 2)).copy()) for k in ("weak", "strong")}


# ----- the PyTorch side -----
class BiasedVariance:
    """Forward hooks on every BatchNorm of a module tracking what Keras' moving variance would be (the moving
    average of the biased batch variance), beside PyTorch's own (unbiased)."""

    def __init__(self, module):
        import torch

        self.shadow = {}
        for name, bn in module.named_modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                self.shadow[name] = bn.running_var.detach().clone()
                bn.register_forward_pre_hook(self._hook(name))

    def _hook(self, name):
        def hook(bn, inputs):
            if bn.training:
                x = inputs[0].detach()
                dims = [0] + list(range(2, x.dim()))
                self.shadow[name].mul_(1 - bn.momentum).add_(bn.momentum * x.var(dim=dims, unbiased=False))
        return hook


def build_torch(method, model, state, setup=SETUP):
    import torch

    import parity_torch
    from cmsf_tf import convert
    from cmsf_tf.models import backbones, heads

    feat = backbones.feature_dim(setup["arch"], setup["width"])
    hidden, dim = heads.head_dims(feat)
    step = parity_torch.OfficialStep(method, setup["arch"], setup["width"], hidden, dim, setup["bank_size"],
                                     setup["num_images"], setup["num_classes"], setup["topk"], setup["topk_prime"],
                                     m=setup["ema_momentum"], conf_threshold=setup["conf_threshold"])
    tensors = lambda part: {k: torch.from_numpy(v) for k, v in convert.torch_state_dict(getattr(model, part),
                                                                                        part).items()}
    for part in _TORCH_PARTS:
        _torch_module(step, part).load_state_dict(tensors(part))
    if method == "cmsf_pseudo":
        step.mlp_head.load_state_dict(tensors("pseudo_head"))
        step.mlp_head.eval()  # train_pseudo_cmsf.py:269
    with torch.no_grad():
        step.queue.copy_(torch.from_numpy(state["bank_embeddings"]))
        step.labels.copy_(torch.from_numpy(state["bank_labels"].astype(np.int64)))
        step.gt_labels.copy_(torch.from_numpy(state["bank_true_labels"].astype(np.int64)))
        step.index_queue.copy_(torch.from_numpy(state["bank_image_indices"]))
        step.queue_ptr.fill_(int(state["bank_pointer"]))
        if method == "cmsf_2q":
            step.pool.copy_(torch.from_numpy(np.transpose(state["pool"], (1, 0, 2)).copy()))
            step.pool_qindex.copy_(torch.from_numpy((state["pool_writes"] % 2).astype(np.int64)))
        if method == "cmsf_km":
            step.pseudo_labels.copy_(torch.from_numpy(state["cluster_ids"].astype(np.int64)))
    return step


def torch_step(step, optimizer, batch):
    import torch

    inputs = model_inputs(batch)
    as_long = lambda key: torch.from_numpy(np.asarray(batch[key]).astype(np.int64))
    optimizer.zero_grad()
    loss, sets, details = step(inputs["strong"], inputs["weak"], as_long("label"), as_long("true_label"),
                               as_long("index"), as_long("is_labelled"))
    loss.backward()
    optimizer.step()
    return float(loss.detach()), [s.numpy() for s in sets], details


def torch_target_after_ema(step):
    """The target's parameters as the official step will use them next: the EMA is applied at the start of
    the next forward pass, ours at the end of this step."""
    m = step.m
    return {name: (m * t + (1 - m) * q).detach().numpy() for (name, t), q in
            zip(step.encoder_t.named_parameters(), step.encoder_q.parameters())}


def compare_networks(model, step, shadows, ema_target):
    """{quantity: deviation} over the online and target networks: ours against expected_state, and our
    running variances also against PyTorch's own (unbiased) ones, the named difference."""
    from cmsf_tf import convert

    expected = expected_state(step, shadows, ema_target)
    result = {}
    for side, parts in (("online", ("online_backbone", "online_projector", "predictor")),
                        ("target", ("target_backbone", "target_projector"))):
        weights, means, variances, torch_variances = [], [], [], []
        for part in parts:
            ours = convert.torch_state_dict(getattr(model, part), part)
            theirs, own = expected[part], _torch_module(step, part).state_dict()
            for name, value in ours.items():
                if name.endswith("num_batches_tracked"):
                    continue
                if name.endswith("running_var"):
                    variances.append(deviation(value, theirs[name]))
                    torch_variances.append(deviation(value, own[name].numpy()))
                elif name.endswith("running_mean"):
                    means.append(deviation(value, theirs[name]))
                else:
                    weights.append(deviation(value, theirs[name]))
        result[f"{side} weights"] = max(weights)
        result[f"{side} BN mean"] = max(means)
        result[f"{side} BN var (biased average)"] = max(variances)
        result[f"{side} BN var vs PyTorch's unbiased (named difference)"] = max(torch_variances)
    return result


def set_differences(ours, theirs, sims):
    """Queries whose neighbour sets differ, not counting swaps between rows whose similarities to the query
    are within 1e-6 (ties)."""
    differ = 0
    for q in range(len(ours)):
        a, b = set(ours[q].tolist()), set(theirs[q].tolist())
        if a == b:
            continue
        swapped = [sims[q, i] for i in a ^ b]
        if max(swapped) - min(swapped) > 1e-6:
            differ += 1
    return differ


# Where each part of our model sits on the PyTorch side: (module of OfficialStep, index in it, which
# BiasedVariance shadow tracks its BatchNorms, the prefix of its names in that shadow).
_TORCH_PARTS = {"online_backbone": ("encoder_q", 0, "online", "0."),
                "online_projector": ("encoder_q", 1, "online", "1."),
                "predictor": ("predict_q", None, "predictor", ""),
                "target_backbone": ("encoder_t", 0, "target", "0."),
                "target_projector": ("encoder_t", 1, "target", "1.")}


def _torch_module(step, part):
    name, index, _, _ = _TORCH_PARTS[part]
    module = getattr(step, name)
    return module if index is None else module[index]


def sync_torch(step, optimizer, shadows, model, method, setup=SETUP):
    """Puts our model's whole state into the PyTorch side, so that the next step's comparison measures that
    step alone: weights and BatchNorm statistics (PyTorch's running variance and the biased-average shadow
    both take ours), SGD momentum (Keras keeps -lr x PyTorch's buffer), the target as the official step
    holds it before its EMA (ours has applied it: undone here), bank, pools and cluster ids."""
    import torch

    from cmsf_tf import convert

    m, lr = setup["ema_momentum"], setup["learning_rate"]
    with torch.no_grad():
        online = {}
        for part in _TORCH_PARTS:
            module = _torch_module(step, part)
            tensors = convert.torch_state_dict(getattr(model, part), part)
            if part.startswith("target"):  # ours: m * t + (1 - m) * q after the step; theirs applies it next
                q = convert.torch_state_dict(getattr(model, part.replace("target", "online")), part)
                tensors = {k: ((v - (1 - m) * q[k]) / m if not k.endswith(
                    ("running_mean", "running_var", "num_batches_tracked")) else v) for k, v in tensors.items()}
            module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
            _, _, which, prefix = _TORCH_PARTS[part]
            for k, v in tensors.items():
                if k.endswith("running_var"):
                    shadows[which].shadow[prefix + k[:-len(".running_var")]].copy_(torch.from_numpy(v))
            if not part.startswith("target"):
                online[part] = module
        # momentum: PyTorch's buffer of each parameter from Keras' slot of the variable it maps to
        slots = {}
        for part, module in online.items():
            for name, (variable, kind) in convert._slots(part, getattr(model, part)).items():
                slots[id(module.get_parameter(name)) if not name.endswith(("running_mean", "running_var"))
                      else None] = (variable, kind)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in slots:
                    continue
                variable, kind = slots[id(p)]
                velocity = model.optimizer.momentums[model.optimizer._get_variable_index(variable)].numpy()
                buffer = convert._to_torch(-velocity / lr, kind)
                optimizer.state[p]["momentum_buffer"] = torch.from_numpy(np.ascontiguousarray(buffer))
        bank = model.bank
        step.queue.copy_(torch.from_numpy(bank.embeddings.numpy()))
        step.labels.copy_(torch.from_numpy(bank.labels.numpy().astype(np.int64)))
        step.gt_labels.copy_(torch.from_numpy(bank.true_labels.numpy().astype(np.int64)))
        step.index_queue.copy_(torch.from_numpy(bank.image_indices.numpy().astype(np.int64)))
        step.queue_ptr.fill_(int(bank.pointer.numpy()))
        if method == "cmsf_2q":
            pool = model.pool.embeddings.numpy().reshape(setup["num_images"], 2, -1)
            step.pool.copy_(torch.from_numpy(np.transpose(pool, (1, 0, 2)).copy()))
            step.pool_qindex.copy_(torch.from_numpy((model.pool.writes.numpy() % 2).astype(np.int64)))
        if method == "cmsf_km":
            step.pool.copy_(torch.from_numpy(model.pool.latest()[0].numpy()))
            step.pseudo_labels.copy_(torch.from_numpy(model.cluster_ids.numpy().astype(np.int64)))


def free_running(method, steps, batches, setup=SETUP):
    """Both sides for `steps` steps without resynchronising, and PyTorch against itself with its initial
    online weights perturbed by PERTURBATION (relative): how far round-off alone carries a run here.
    Returns [(step, loss ours vs theirs, weights ours vs theirs, loss theirs vs perturbed, weights ...)]."""
    import torch

    import parity_torch
    from cmsf_tf import convert

    data = batches["half" if method == "cmsf_pseudo" else "all"]
    state = initial_state(method, data, setup)
    model = build_ours(method, state, setup)
    sides = [build_torch(method, model, state, setup) for _ in range(2)]
    optimizers = [parity_torch.make_optimizer(side, setup["learning_rate"], setup["momentum"],
                                              setup["weight_decay"]) for side in sides]
    for side, optimizer in zip(sides, optimizers):
        side.train()
        if method == "cmsf_pseudo":
            side.mlp_head.eval()
        shadows = {"online": BiasedVariance(side.encoder_q), "target": BiasedVariance(side.encoder_t),
                   "predictor": BiasedVariance(side.predict_q)}
        sync_torch(side, optimizer, shadows, model, method, setup)  # the target and momentum under way
    with torch.no_grad():
        generator = torch.Generator().manual_seed(setup["seed"])
        for p in sides[1].encoder_q.parameters():
            p.mul_(1 + PERTURBATION * torch.randn(p.shape, generator=generator))
    rows = []
    for i, batch in enumerate(data[:steps]):
        ours, _, _ = our_step(model, batch)
        theirs, perturbed = [torch_step(side, opt, batch)[0] for side, opt in zip(sides, optimizers)]
        weights = lambda side: {k: v.numpy() for k, v in side.encoder_q[0].state_dict().items()}
        a, b = weights(sides[0]), weights(sides[1])
        mine = convert.torch_state_dict(model.online_backbone)
        trained = [k for k in a if not k.endswith(("num_batches_tracked", "running_var", "running_mean"))]
        rows.append((i + 1, abs(ours - theirs) / abs(theirs), max(deviation(mine[k], a[k]) for k in trained),
                     abs(perturbed - theirs) / abs(theirs), max(deviation(b[k], a[k]) for k in trained)))
    return rows


# A pseudo-label head round after CMSF-Pseudo's steps: passes, learning rate, batch size (a divisor of the
# cached rows: the official round drops a last partial batch, ours trains on it). Run twice: at a constant
# learning rate (as the paper's rounds, whose milestones are never reached), and with a milestone inside the
# round, where Keras' own SGD would part from PyTorch's (hence head_training.TorchSGD; its docstring).
HEAD_ROUND = dict(epochs=3, lr=0.05, batch_size=4, seed=7)


def compare_head_rounds(model, setup=SETUP):
    """compare_head_round without and with a learning-rate milestone, on copies of the head."""
    import keras

    result = {}
    for milestones, title in (((), "pseudo head round"),
                              ((2,), "pseudo head round with an lr milestone")):
        head = keras.Model.from_config(model.pseudo_head.get_config())
        head.set_weights(model.pseudo_head.get_weights())
        for name, value in compare_head_round(model, head, milestones, setup).items():
            result[f"{title}: {name}"] = value
    return result


def compare_head_round(model, head, milestones, setup=SETUP):
    """Our PseudoLabelTrainer's round (callbacks/pseudo_label.train_head) of `head` against the official one
    on the labelled cache our steps filled, from the same weights; {quantity: deviation}."""
    import torch

    import parity_torch
    from cmsf_tf import convert
    from cmsf_tf.callbacks.pseudo_label import train_head
    from cmsf_tf.models import heads

    features, labels = model.labelled_cache.contents()
    features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
    rows = len(features) - len(features) % HEAD_ROUND["batch_size"]
    features, labels = features[:rows], labels[:rows]
    dim = model.embedding_dim
    theirs = parity_torch.get_mlp(dim, 2 * dim, setup["num_classes"])
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in convert.torch_state_dict(head, "pseudo_head").items()})
    shadow = BiasedVariance(theirs)
    epochs, seed = HEAD_ROUND["epochs"], HEAD_ROUND["seed"]
    orders = [np.random.default_rng([seed, epoch]).permutation(rows) for epoch in range(epochs)]  # ours: head_training
    parity_torch.pseudo_label_round(theirs, features, labels, orders, HEAD_ROUND["lr"], milestones,
                                    HEAD_ROUND["batch_size"])
    train_head(head, features, labels, epochs, HEAD_ROUND["lr"], milestones, HEAD_ROUND["batch_size"], seed=seed)
    ours = convert.torch_state_dict(head, "pseudo_head")
    want = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    weights = max(deviation(ours[k], want[k]) for k in ours if not k.endswith(("running_mean", "running_var",
                                                                                 "num_batches_tracked")))
    return {"weights": weights, "BN mean": deviation(ours["1.running_mean"], want["1.running_mean"]),
            "BN var (biased average)": deviation(ours["1.running_var"], shadow.shadow["1"].numpy()),
            "cached rows (count)": float(rows)}


def compare_method(method, steps, batches, setup=SETUP, log=print):
    """Runs both steps side by side, PyTorch's state set to ours before each step; returns ({quantity: largest
    deviation}, golden dict, whose expectations are the first step's)."""
    import torch

    torch.manual_seed(setup["seed"])
    torch.use_deterministic_algorithms(True)
    data = batches["half" if method == "cmsf_pseudo" else "all"]
    state = initial_state(method, data, setup)
    model = build_ours(method, state, setup)
    weights = initial_weights(model)
    step = build_torch(method, model, state, setup)
    import parity_torch

    optimizer = parity_torch.make_optimizer(step, setup["learning_rate"], setup["momentum"], setup["weight_decay"])
    step.train()
    if method == "cmsf_pseudo":
        step.mlp_head.eval()
    shadows = {"online": BiasedVariance(step.encoder_q), "target": BiasedVariance(step.encoder_t),
               "predictor": BiasedVariance(step.predict_q)}
    worst = {}
    golden = {"loss": [], "sets": [], "bank": [], "query_labels": []}

    def note(name, value):
        worst[name] = max(worst.get(name, 0.0), value)

    for i, batch in enumerate(data[:steps]):
        # Each step from the same state (the first included: it carries the target and momentum over), so
        # the comparison measures this step, not the ones before.
        sync_torch(step, optimizer, shadows, model, method, setup)
        ours_loss, ours_sets, ours_labels = our_step(model, batch)
        theirs_loss, theirs_sets, details = torch_step(step, optimizer, batch)
        note("loss", abs(ours_loss - theirs_loss) / max(abs(theirs_loss), 1e-12))
        bank = model.bank.embeddings.numpy()
        sims = details["targets"].numpy() @ step.queue.numpy().T  # to tell ties from differences
        for s, (a, b) in enumerate(zip(ours_sets, theirs_sets)):
            name = "neighbour sets (queries differing)" if s == 0 else "unconstrained sets (queries differing)"
            note(name, set_differences(a, b, sims))
        note("bank rows", deviation(bank, step.queue.numpy()))
        note("bank labels (rows differing)", float(np.sum(model.bank.labels.numpy() != step.labels.numpy())))
        note("bank image indices (rows differing)",
             float(np.sum(model.bank.image_indices.numpy() != step.index_queue.numpy())))
        if method == "cmsf_pseudo":
            note("pseudo query labels (differing)", float(np.sum(ours_labels != details["query_labels"].numpy())))
        if method == "cmsf_2q":
            ours_pool = model.pool.embeddings.numpy().reshape(setup["num_images"], 2, -1)
            note("2Q pool", deviation(ours_pool, np.transpose(step.pool.numpy(), (1, 0, 2))))
            looked_up = step.pool[step.pool_qindex[step.index_queue], step.index_queue, :].numpy()
            note("2Q M' (previous views of the bank rows)", deviation(model.previous_bank.embeddings.numpy(), looked_up))
        if method == "cmsf_km":
            note("KM pool", deviation(model.pool.latest()[0].numpy()[data[i]["index"]],
                                      step.pool.numpy()[data[i]["index"]]))
            note("KM cluster ids (differing)", float(np.sum(model.cluster_ids.numpy() != step.pseudo_labels.numpy())))
        for name, value in compare_networks(model, step, shadows, torch_target_after_ema(step)).items():
            note(name, value)
        if i == 0:  # the golden file holds the first step (from the initial state, no PyTorch needed to set up)
            golden["loss"].append(theirs_loss)
            golden["sets"].append(np.stack(theirs_sets))
            golden["bank"].append(step.queue.numpy().copy())
            golden["query_labels"].append(np.asarray(details.get("query_labels", torch.zeros(0))).astype(np.int32))
            golden["final"] = expected_state(step, shadows, torch_target_after_ema(step))
        log(f"  {method} step {i + 1}: loss ours {ours_loss:.7f} theirs {theirs_loss:.7f}")
    if method == "cmsf_pseudo":
        worst.update(compare_head_rounds(model, setup))
    return worst, {"state": state, "weights": weights, "golden": golden}


def expected_state(step, shadows, ema_target):
    """What our networks must hold, from the PyTorch side: {part: torch-named state dict}, BatchNorm running
    variances under the biased convention (the shadows), the target's parameters as the official step will
    use them next (after its EMA)."""
    expected = {}
    for part, (_, _, which, prefix) in _TORCH_PARTS.items():
        tensors = {k: v.numpy().copy() for k, v in _torch_module(step, part).state_dict().items()
                   if not k.endswith("num_batches_tracked")}
        for name in list(tensors):
            if name.endswith("running_var"):
                tensors[name] = shadows[which].shadow[prefix + name[:-len(".running_var")]].numpy().copy()
            if part.startswith("target") and prefix + name in ema_target:
                tensors[name] = ema_target[prefix + name]
        expected[part] = tensors
    return expected


def kept_in_golden(part, name):
    """The final weights a golden file keeps: all of the heads and every BatchNorm tensor, the stem and the
    first stage's convolutions; the larger convolutions of the later stages are left out to keep the files
    small (their gradients show in the BatchNorm statistics after them and in each step's loss)."""
    big_conv = name.startswith(("layer2", "layer3", "layer4")) and (".conv" in name or "downsample.0" in name)
    return not (part.endswith("backbone") and big_conv)


SHARED_INIT = ("online_backbone", "online_projector", "predictor")


def write_shared_init(path, result):
    """tests/data/parity/init.npz: the online network every method's golden file starts from (the models of
    all methods draw it alike from the seed; each method's file holds only what it adds, e.g. a head)."""
    np.savez_compressed(path, **{f"init/{part}/{name}": value for part, tensors in result["weights"].items()
                                 if part in SHARED_INIT for name, value in tensors.items()})


def write_golden(path, method, result, batches, setup):
    """tests/data/parity/<method>.npz: the setting, initial weights and state, the first batch, and what the
    official step computed from them (loss, neighbour sets, bank; the weights after it, kept_in_golden)."""
    arrays = {"setup": np.array(json.dumps(setup))}
    for part, tensors in result["weights"].items():
        if part in SHARED_INIT:
            continue  # in init.npz: every method starts from the same online network
        for name, value in tensors.items():
            arrays[f"init/{part}/{name}"] = value
    for name, value in result["state"].items():
        arrays[f"state/{name}"] = value
    data = batches["half" if method == "cmsf_pseudo" else "all"]
    for i, batch in enumerate(data[:len(result["golden"]["loss"])]):
        for key, value in batch.items():
            arrays[f"batch{i}/{key}"] = value
    golden = result["golden"]
    arrays["expect/loss"] = np.array(golden["loss"], np.float64)
    arrays["expect/sets"] = np.stack(golden["sets"]).astype(np.int32)
    arrays["expect/bank"] = np.stack(golden["bank"])
    arrays["expect/query_labels"] = np.stack(golden["query_labels"])
    for part, tensors in golden["final"].items():
        for name, value in tensors.items():
            if kept_in_golden(part, name):
                arrays[f"final/{part}/{name}"] = value
    np.savez_compressed(path, **arrays)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "parity"))
    parser.add_argument("--golden", default="", help="write the test fixtures into this directory")
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: tools/parity.py needs PyTorch (pip install -r requirements-test.txt)", file=sys.stderr)
        sys.exit(2)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method {unknown[0]}; choose from {', '.join(METHODS)}", file=sys.stderr)
        sys.exit(2)
    started = time.time()
    _, batches = make_data(SETUP, args.steps)
    table, free = {}, {}
    for method in methods:
        worst, result = compare_method(method, args.steps, batches, SETUP)
        table[method] = worst
        free[method] = free_running(method, args.steps, batches, SETUP)
        if args.golden:
            os.makedirs(args.golden, exist_ok=True)
            write_golden(os.path.join(args.golden, f"{method}.npz"), method, result, batches, SETUP)
            shared = os.path.join(args.golden, "init.npz")
            if method == methods[0]:
                write_shared_init(shared, result)
            else:  # the methods must agree on it, or one shared file would be wrong for some
                with np.load(shared) as f:
                    assert all(np.array_equal(f[f"init/{part}/{name}"], value) for part in SHARED_INIT
                               for name, value in result["weights"][part].items()), method
    lines = render(table, args.steps) + [""] + render_free(free)
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "parity.json"), "w") as f:
        json.dump({"setup": SETUP, "steps": args.steps, "tolerance": TOLERANCE, "table": table, "free_running": free,
                   "seconds": round(time.time() - started, 1)}, f, indent=2)
    with open(os.path.join(args.out, "parity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    failed = [(m, q) for m, row in table.items() for q, v in row.items() if not passes(q, v)]
    if failed:
        print(f"FAILED: {', '.join(f'{m} {q}' for m, q in failed)}", file=sys.stderr)
        sys.exit(1)


def passes(quantity, value):
    if "named difference" in quantity or "(count)" in quantity:
        return True
    if "differing" in quantity:
        return value == 0
    return value <= TOLERANCE


def render_free(free):
    """The free-running comparison: per step, ours vs theirs beside theirs vs theirs perturbed."""
    lines = ["Without resynchronising: loss (relative) and online backbone weights, ours vs theirs | theirs vs "
             f"theirs with the initial weights perturbed by {PERTURBATION:g} (round-off alone)", ""]
    steps = max(len(rows) for rows in free.values())
    lines.append("| method | " + " | ".join(f"step {i + 1}" for i in range(steps)) + " |")
    lines.append("|---|" + "---|" * steps)
    for method, rows in free.items():
        cells = [f"{r[1]:.0e} / {r[2]:.0e} \\| {r[3]:.0e} / {r[4]:.0e}" for r in rows]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def render(table, steps):
    quantities = []
    for row in table.values():
        quantities += [q for q in row if q not in quantities]
    lines = [f"Largest deviation over {steps} steps, each from the same state, ours vs the authors' step in PyTorch "
             f"(|a-b| / max(1, |b|); counts for sets, labels and ids; tolerance {TOLERANCE:g})", ""]
    lines.append("| quantity | " + " | ".join(table) + " |")
    lines.append("|---|" + "---|" * len(table))
    for q in quantities:
        cells = []
        for method in table:
            v = table[method].get(q)
            cells.append("" if v is None else (f"{int(v)}" if "differing" in q or "(count)" in q else f"{v:.1e}")
                         + ("" if v is None or passes(q, v) else " ✗"))
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()

"""MeanShift: the one keras.Model every method of the family is.

It owns the online network (backbone, projector, predictor), the EMA target network (backbone,
projector), the memory bank, the metrics and the train-step skeleton:

  weak view  -> target -> t (unit, no gradient) -> gathered from all replicas -> written to the bank
  strong view (and --multi_crop's small crops) -> online + predictor -> q
  neighbour sets of t in the bank (a method's hook) -> loss = sum_w w * mean_shift_loss(q, bank, set),
  averaged over the query views

A method overrides `neighbour_sets` (its constraint) and, where it needs them, `query_labels`,
`write_state` (per-image state written with the gathered batch) and `extra_metrics`. When a method
returns two neighbour sets (constrained first, unconstrained second), `purity` is measured on the
first and `purity_unconstrained` on the second, and `constrained_rank` (a RankHistogram) tracks where
the constrained neighbours stand in the unconstrained order.
"""

import keras
import tensorflow as tf

from cmsf_tf import config, distribute, ops
from cmsf_tf.data import augment
from cmsf_tf.memory import MemoryBank
from cmsf_tf.models import backbones, heads


class TrainingPlumbing:
    """What every model trained by cmsf_tf.train shares, whatever its loss (mixed into MeanShift and
    CrossEntropy; a mixin, not a base class, so each model stays one level below keras.Model): the
    batch counter, Keras' symbolic-build workaround, optimizer slots for the trained weights only, the
    paper's coupled L2 weight decay with the replica division and loss scaling, and multi-worker logs."""

    # ----- what a method tells cmsf_tf.train (so that adding a method is one file + one registry line) -----
    needs_labels = False  # trains on training labels (refused on unlabelled images)

    @classmethod
    def views(cls, cfg):
        """{"strong_view": bool, "third_view": bool, "multi_crop": (n, size, min, max) or None}: the views its
        batches carry besides the weak one (pipeline.train_dataset's arguments)."""
        return {"strong_view": True, "third_view": False,
                "multi_crop": config.multi_crop_spec(cfg.multi_crop, cfg.image_size)}

    @classmethod
    def from_run_config(cls, cfg, *, sync_bn, num_images, num_classes):
        """The model a run's Config describes."""
        raise NotImplementedError

    @classmethod
    def training_callbacks(cls, cfg, *, steps_per_epoch, logdir, log, jit_compile=False):
        """Keras callbacks the method's training needs (epoch-end clustering, head training, ...); run
        before the checkpoint saver, so a checkpoint holds what they computed. `logdir`: TensorBoard
        directory (None on non-chief workers); `jit_compile`: whether the run compiles with XLA (their
        own computations should too: on a TPU nothing else runs on the accelerator)."""
        return []

    def _add_step_counter(self):
        # Batches trained on. Not optimizer.iterations: float16 loss scaling skips the update (and the
        # iteration count) on overflowing steps, but the batch was consumed, and epochs, resume points
        # and summaries must follow the data.
        self.train_steps = self.add_weight(shape=(), initializer="zeros", dtype="int64", trainable=False,
                                           aggregation="only_first_replica", name="train_steps")

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' fit() under a tf.distribute strategy pulls one batch off the data iterator to build the
        model symbolically and drops it; with steps_per_epoch the iterator persists, so training would
        silently skip a batch and then run out of data a step early. Everything here is built in
        __init__ and compile(), so there is nothing to build and nothing may be consumed."""
        if self.optimizer is None or not self.optimizer.built:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def compile(self, optimizer, **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        # Build the slots for the trained weights only: fit() would otherwise build them for every
        # "trainable" variable (a mean-shift target included), doubling the optimizer's memory.
        self.optimizer.build(self.online_variables)

    def _scaled_total(self, loss, variables):
        """What the tape differentiates: this replica's mean loss plus the weight decay, divided among
        the replicas and scaled for float16."""
        # The paper's (PyTorch SGD) weight decay is L2 on every weight: gradient += wd * w, which
        # momentum then accumulates. Keras' weight_decay is decoupled, so add it to the loss.
        l2 = ops.coupled_l2(variables, self.weight_decay)
        # Replica gradients are summed by the optimizer: divide the per-replica mean.
        total = (loss + l2) / tf.distribute.get_strategy().num_replicas_in_sync
        return self.optimizer.scale_loss(total)

    @staticmethod
    def _finish_logs(logs):
        if distribute.is_multi_worker():
            # Keras reduces logs across workers with axis=0, which fails on scalars
            # (tensorflow/tensorflow#72388): give it one-element vectors to reduce.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs


# The loss of each group of query views under --multi_crop (ops.view_group_losses's order): the strong view's,
# and the mean over the small crops'. The logged `loss` is their mean over views, (strong + n * small) / (1 + n).
VIEW_LOSS_NAMES = ("loss_strong", "loss_small")

# Queries of each replica batch whose constrained neighbours are ranked in the unconstrained order
# (ranking costs B x k x K comparisons; a sample keeps the metric cheap).
RANK_SAMPLE = 32


class RankHistogram(keras.metrics.Metric):
    """Counts of the constrained neighbours' 0-based ranks in the unconstrained order over an epoch
    (ranks >= bins - 1 share the last bin); `result()` is their mean rank, `counts()` the histogram
    (summed over replicas: metric variables are on-read sums)."""

    def __init__(self, bins=1024, name="constrained_rank", **kwargs):
        super().__init__(name=name, **kwargs)
        self.bins = int(bins)
        self.histogram = self.add_variable(shape=(self.bins,), initializer="zeros", dtype="float32", name="histogram")
        self.rank_sum = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="rank_sum")

    def update_state(self, ranks):
        ranks = tf.reshape(tf.cast(ranks, tf.float32), [-1])
        self.rank_sum.assign_add(tf.reduce_sum(ranks))
        bins = tf.minimum(tf.cast(ranks, tf.int32), self.bins - 1)
        # A segment sum with a static number of segments, not tf.math.bincount: XLA (TPUStrategy,
        # jit_compile) needs the histogram's size as a compile-time constant, which bincount's is not.
        self.histogram.assign_add(tf.math.unsorted_segment_sum(tf.ones_like(ranks), bins, self.bins))

    def result(self):
        return self.rank_sum / tf.maximum(tf.reduce_sum(self.histogram), 1.0)

    def counts(self):
        """int64 NumPy [bins] of this epoch so far."""
        return tf.cast(tf.convert_to_tensor(self.histogram), tf.int64).numpy()


class MeanShift(TrainingPlumbing, keras.Model):
    @classmethod
    def config_options(cls, cfg, num_images, num_classes):
        """Constructor arguments of this method beyond the family's common ones."""
        return {}

    @classmethod
    def from_run_config(cls, cfg, *, sync_bn, num_images, num_classes):
        return cls(**cls.config_options(cfg, num_images, num_classes),
                   arch=cfg.arch, image_size=cfg.image_size, channels=3, width=cfg.width, proj_hidden=cfg.proj_hidden,
                   proj_dim=cfg.proj_dim, bank_size=cfg.bank_size, topk=cfg.topk, ema_momentum=cfg.ema_momentum,
                   weight_decay=cfg.weight_decay, sync_bn=sync_bn, seed=cfg.seed, constraint_fill=cfg.constraint_fill)

    def __init__(self, *, arch, image_size, channels=3, width=64, proj_hidden=0, proj_dim=0,
                 bank_size=128000, topk=5, ema_momentum=0.99, weight_decay=1e-4, sync_bn=False,
                 seed=0, constraint_fill="nearest", **kwargs):
        super().__init__(**kwargs)
        self.topk = int(topk)
        if constraint_fill not in ops.FILLS:
            raise ValueError(f"unknown constraint fill {constraint_fill!r}; choose one of: {', '.join(ops.FILLS)}")
        self.constraint_fill = constraint_fill
        self.ema_momentum = float(ema_momentum)
        self.weight_decay = float(weight_decay)
        feat = backbones.feature_dim(arch, width)
        hidden, dim = heads.head_dims(feat, proj_hidden, proj_dim)
        self.embedding_dim = dim

        def encoder(prefix):
            return (backbones.build_backbone(arch, image_size, channels, width, sync_bn, f"{prefix}_backbone"),
                    heads.mlp(feat, hidden, dim, sync_bn, f"{prefix}_projector"))

        self.online_backbone, self.online_projector = encoder("online")
        self.predictor = heads.mlp(dim, hidden, dim, sync_bn, "predictor")
        self.target_backbone, self.target_projector = encoder("target")
        self.bank = MemoryBank(bank_size, dim, seed=seed, name="bank")
        self._add_step_counter()

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.purity_tracker = keras.metrics.Mean(name="purity")
        self.label_purity_tracker = keras.metrics.Mean(name="label_purity")
        self.unconstrained_purity_tracker = keras.metrics.Mean(name="purity_unconstrained")
        self.rank_tracker = RankHistogram(name="constrained_rank")
        self.extra_trackers = {name: keras.metrics.Mean(name=name) for name in self.extra_metric_names}
        # --multi_crop: the loss of each kind of query view, logged only where small crops come in.
        self.view_loss_trackers = {name: keras.metrics.Mean(name=name) for name in VIEW_LOSS_NAMES}
        self._copy_online_to_target()
        self.built = True  # every weight exists now; custom-train_step models are otherwise never marked built

    # ----- variables -----
    @property
    def online_variables(self):
        """What the optimizer trains. The target's weights are 'trainable' only so that its BatchNorm
        uses batch statistics in training mode, as the reference implementation does; they change
        by EMA alone."""
        return (self.online_backbone.trainable_variables + self.online_projector.trainable_variables
                + self.predictor.trainable_variables)

    def _ema_pairs(self):
        target = self.target_backbone.trainable_variables + self.target_projector.trainable_variables
        online = self.online_backbone.trainable_variables + self.online_projector.trainable_variables
        return list(zip(target, online))

    def _copy_online_to_target(self):
        online = self.online_backbone.weights + self.online_projector.weights
        target = self.target_backbone.weights + self.target_projector.weights
        for t, o in zip(target, online):
            if t.shape != o.shape:
                raise ValueError(f"target and online weights differ in shape: {t.path} vs {o.path}")
            t.assign(o)

    extra_metric_names = ()

    @property
    def metrics(self):
        return [self.loss_tracker, self.purity_tracker, self.label_purity_tracker,
                self.unconstrained_purity_tracker, self.rank_tracker, *self.extra_trackers.values(),
                *self.view_loss_trackers.values()]

    # ----- forward passes -----
    def call(self, images, training=False):
        """Backbone features of the online network: the representation that is evaluated and exported."""
        return self.online_backbone(images, training=training)

    def target_embedding(self, images, training=True):
        feats = self.target_backbone(images, training=training)
        return tf.stop_gradient(ops.l2_normalize(self.target_projector(feats, training=training)))

    def online_prediction(self, images, training=True):
        z = self.online_projector(self.online_backbone(images, training=training), training=training)
        return ops.l2_normalize(self.predictor(z, training=training))

    # ----- method hooks -----
    def query_labels(self, batch, targets):
        """int[B]: each query's label, which label constraints compare with the bank rows' and which
        becomes the label of its own bank row. Called once per step; the other hooks find the result in
        batch["query_label"]."""
        return batch["label"]

    def label_neighbours(self, sims, query_labels, bank_labels):
        """The top-k among the bank rows of the query's label, filled by the run's --constraint_fill rule."""
        return ops.label_neighbours(sims, query_labels, bank_labels, self.topk, self.constraint_fill)

    def neighbour_sets(self, batch, targets, sims):
        """List of (weight, int32[B, k] bank indices) whose weighted losses are summed.

        `sims` is the [B, K] similarity of the targets to the bank (the batch already written).
        The default is MSF's: the unconstrained top-k."""
        return [(1.0, ops.top_k_indices(sims, self.topk))]

    def step_embeddings(self, batch, targets):
        """{name: [B, D] tensor} a method computes once per step beside the targets (CMSF-2Q's third
        view). They are added to the batch the other hooks see and gathered from all replicas for
        write_state, like the targets."""
        return {}

    def write_state(self, targets, labels, true_labels, indices, is_labelled, **step_embeddings):
        """Called with the batch gathered from all replicas right after the bank write (the same rows
        on every replica): where per-image state (pools) is updated."""

    def extra_metrics(self, batch, targets, sims, sets):
        """{name in extra_metric_names: scalar} averaged over the epoch like the loss."""
        return {}

    # ----- the step -----
    def train_step(self, batch):
        batch = augment.model_views(batch)  # uint8 views -> normalised float, here on the accelerator
        targets = self.target_embedding(batch["weak"])
        extra = self.step_embeddings(batch, targets)
        batch = dict(batch, query_label=self.query_labels(batch, targets), **extra)
        # is_labelled travels as int32: collectives do not all-gather booleans on every platform.
        rows = distribute.gather(targets, batch["query_label"], batch["true_label"], batch["index"],
                                 tf.cast(batch["is_labelled"], tf.int32), *extra.values())
        self.bank.write(*rows[:4])
        self.write_state(*rows[:4], rows[4] > 0, **dict(zip(extra, rows[5:])))
        bank = tf.stop_gradient(tf.convert_to_tensor(self.bank.embeddings))
        sims = ops.similarities(targets, bank)
        sets = self.neighbour_sets(batch, targets, sims)

        variables = self.online_variables
        with tf.GradientTape() as tape:
            query_views = [(1, self.online_prediction(batch["strong"]))]
            if "small" in batch:  # --multi_crop: [B, n, s, s, 3], one forward pass (and BatchNorm batch) for all
                small = batch["small"]
                query_views.append((small.shape[1], self.online_prediction(tf.reshape(small, [-1, *small.shape[2:]]))))
            view_losses = ops.view_group_losses(query_views, bank, sets)
            loss = ops.mean_over_views([n for n, _ in query_views], view_losses)
            scaled = self._scaled_total(loss, variables)
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self._ema_update()
        self.train_steps.assign_add(1)

        self.loss_tracker.update_state(loss)
        _, first_set = sets[0]
        # purity: neighbours sharing the query's true label (monitoring only); label_purity: sharing its
        # training label (noisy or missing labels included), i.e. what a label constraint sees.
        self.purity_tracker.update_state(
            ops.purity(batch["true_label"], tf.convert_to_tensor(self.bank.true_labels), first_set))
        self.label_purity_tracker.update_state(
            ops.purity(batch["label"], tf.convert_to_tensor(self.bank.labels), first_set))
        logs = {"loss": self.loss_tracker.result(), "purity": self.purity_tracker.result(),
                "label_purity": self.label_purity_tracker.result(),
                "lr": tf.cast(self.optimizer.learning_rate, tf.float32)}
        if len(sets) > 1:
            self.unconstrained_purity_tracker.update_state(
                ops.purity(batch["true_label"], tf.convert_to_tensor(self.bank.true_labels), sets[-1][1]))
            logs["purity_unconstrained"] = self.unconstrained_purity_tracker.result()
            self.rank_tracker.update_state(ops.ranks_in_order(sims[:RANK_SAMPLE], sets[0][1][:RANK_SAMPLE]))
            logs["constrained_rank"] = self.rank_tracker.result()
        if len(view_losses) > 1:
            for name, value in zip(VIEW_LOSS_NAMES, view_losses):
                self.view_loss_trackers[name].update_state(value)
                logs[name] = self.view_loss_trackers[name].result()
        for name, value in self.extra_metrics(batch, targets, sims, sets).items():
            self.extra_trackers[name].update_state(value)
            logs[name] = self.extra_trackers[name].result()
        return self._finish_logs(logs)

    def _ema_update(self):
        m = self.ema_momentum

        def update(strategy, pairs):
            for target, online in pairs:
                strategy.extended.update(target, lambda t, o: t.assign(m * t + (1.0 - m) * o), args=(online,))

        # In cross-replica context (merge_call) the update is applied once per mirrored copy, each
        # with its own replica's online weights, which are equal after the all-reduced step.
        pairs = [(t.value, o.value) for t, o in self._ema_pairs()]
        tf.distribute.get_replica_context().merge_call(update, args=(pairs,))

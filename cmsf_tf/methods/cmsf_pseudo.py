"""Semi-supervised CMSF-Pseudo: constrain the neighbours by ground-truth labels where they exist and by
confident pseudo-labels elsewhere.

A pseudo-label head (Linear-BN-ReLU-Linear, D -> 2D -> classes) reads the target embedding of every
image. Query label: the ground truth for labelled images; for the others the head's top-1 class if its
probability is at least `conf_threshold`, else -1 (no constraint: the plain MSF neighbours). The bank
stores these labels, and -1 rows never match a label. Loss = the constrained loss alone; the plain MSF
neighbours are a zero-weight second set, there only so that their purity is reported next to the
constrained one's.

The head is not trained by the step: `callbacks.pseudo_label.PseudoLabelTrainer` trains it on the
`labelled_cache` (target embeddings and labels of recently seen labelled images, optionally also
confident pseudo-labelled ones) at the middle and at the end of every epoch.
"""

import tensorflow as tf

from cmsf_tf import ops
from cmsf_tf.memory import LabelledCache
from cmsf_tf.methods.base import MeanShift
from cmsf_tf.models import heads


class CMSFPseudo(MeanShift):
    needs_labels = True  # the labelled subset trains the pseudo-label head
    extra_metric_names = ("pseudo_accuracy", "confident_fraction")

    @classmethod
    def config_options(cls, cfg, num_images, num_classes):
        return dict(num_classes=num_classes, conf_threshold=cfg.conf_threshold, cache_size=cfg.labelled_cache_size,
                    cache_confident=cfg.pseudo_cache_confident)

    @classmethod
    def training_callbacks(cls, cfg, *, steps_per_epoch, logdir, log, jit_compile=False):
        from cmsf_tf.callbacks.pseudo_label import PseudoLabelTrainer

        return [PseudoLabelTrainer(steps_per_epoch, cfg.pseudo_epochs, cfg.pseudo_lr,
                                   [int(m) for m in cfg.pseudo_milestones], cfg.pseudo_batch_size, cfg.seed,
                                   logdir=logdir, log=log, weight_decay=cfg.pseudo_weight_decay,
                                   jit_compile=jit_compile)]

    def __init__(self, *, num_classes, conf_threshold=0.85, cache_size=128000, cache_confident=False,
                 sync_bn=False, **kwargs):
        super().__init__(sync_bn=sync_bn, **kwargs)
        self.num_classes = int(num_classes)
        self.conf_threshold = float(conf_threshold)
        self.cache_confident = bool(cache_confident)
        dim = self.embedding_dim
        self.pseudo_head = heads.mlp(dim, 2 * dim, self.num_classes, sync_bn, "pseudo_head")
        self.labelled_cache = LabelledCache(cache_size, dim, name="labelled_cache")

    def pseudo_probabilities(self, targets):
        return tf.nn.softmax(tf.cast(self.pseudo_head(targets, training=False), tf.float32), axis=-1)

    def query_labels(self, batch, targets):
        return ops.pseudo_query_labels(batch["label"], batch["is_labelled"], self.pseudo_probabilities(targets),
                                       self.conf_threshold)

    def neighbour_sets(self, batch, targets, sims):
        return [(1.0, self.label_neighbours(sims, batch["query_label"], self.bank.labels)),
                (0.0, ops.top_k_indices(sims, self.topk))]

    def write_state(self, targets, labels, true_labels, indices, is_labelled):
        keep = is_labelled | (labels >= 0) if self.cache_confident else is_labelled
        self.labelled_cache.write(targets, labels, keep)

    def extra_metrics(self, batch, targets, sims, sets):
        # Pseudo-labels of the unlabelled images against their hidden true labels: how often the head is
        # confident, and how often it is right when it is.
        labels = batch["query_label"]
        unlabelled = tf.logical_not(batch["is_labelled"])
        confident = unlabelled & (labels >= 0)
        correct = tf.cast(labels == tf.cast(batch["true_label"], tf.int32), tf.float32)
        n_confident = tf.reduce_sum(tf.cast(confident, tf.float32))
        n_unlabelled = tf.reduce_sum(tf.cast(unlabelled, tf.float32))
        return {"pseudo_accuracy": tf.math.divide_no_nan(tf.reduce_sum(correct * tf.cast(confident, tf.float32)),
                                                         n_confident),
                "confident_fraction": tf.math.divide_no_nan(n_confident, n_unlabelled)}

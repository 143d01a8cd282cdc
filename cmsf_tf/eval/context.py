"""What every evaluation protocol starts from, built once per command: the network, the data it is
evaluated on (the command line's, else the run's own), its labels, and cached features.

A protocol (cmsf_tf.eval.protocols) receives an `EvalContext` and asks it for the source, the labelled
subset or the features of a split; it never reads flags.json or joins a path onto --model_dir.
"""

import hashlib
import json
import os
import sys

import numpy as np

from cmsf_tf.errors import UserError
from cmsf_tf.rundir import RunDir


class EvalContext:
    """`cfg`: an EvalConfig (its data settings may be None: the run's apply); `encoder`: an
    eval.encoder.Encoder; `log`: a callable taking one line."""

    def __init__(self, cfg, encoder, log):
        self.cfg, self.encoder, self.log = cfg, encoder, log
        self.run = RunDir(cfg.model_dir)
        run = encoder.info.get("run", {})
        pick = lambda name, default="": getattr(cfg, name) if getattr(cfg, name) is not None else run.get(name, default)  # noqa: E731
        self.dataset = pick("dataset", None)
        if self.dataset is None:
            raise UserError("--dataset is needed: the SavedModel does not record its training data")
        self.data_dir, self.class_list, self.label_split = pick("data_dir"), pick("class_list"), pick("label_split")
        self.seed = run.get("seed", cfg.seed)
        self._source = None

    # ----- data -----
    def source(self):
        """The evaluation data set (loaded once)."""
        if self._source is None:
            self._source = load_source(self.dataset, self.data_dir, self.class_list)
        return self._source

    def labelled_source(self, what):
        """The source, refused in one sentence when its training images have no labels (`what` needs them)."""
        source = self.source()
        if not source.has_train_labels():
            raise UserError(source.no_labels_reason(self.dataset, what))
        return source

    def label_plan(self, source=None):
        """LabelPlan of the labelled subset (true labels, -1 elsewhere), as the training run drew it."""
        from cmsf_tf.data import labels

        return labels.training_labels(source or self.source(), self.label_split or "", seed=self.seed,
                                      dataset=self.dataset)

    def labelled_subset(self, source=None):
        """(plan, keep, subset name, count) of the labelled training images of the label split (all images
        when there is none): `keep` is the pipeline filter for `features`, None for all."""
        source = source or self.source()
        plan = self.label_plan(source)
        if not self.label_split:
            return plan, None, "all", labelled_count(plan, source)
        fn = plan.make_fn()
        return (plan, lambda index, label, name: fn(index, label, name) >= 0, f"labelled:{self.label_split}",
                labelled_count(plan, source))

    # ----- features -----
    def features(self, source, dataset, split, keep=None, keep_name="all", count=None):
        """(features, labels): L2-normalised backbone features of a split, kept in eval/features/ with
        --cache_features and reused. `count`: how many images `keep` selects, when known (progress line)."""
        import keras

        from cmsf_tf.data import pipeline
        from cmsf_tf.eval import knn

        enc = self.encoder
        identity = {"network": {k: enc.info.get(k) for k in ("kind", "path", "step", "encoder")},
                    "dataset": dataset, "split": split, "subset": keep_name, "image_size": enc.image_size}
        key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(self.run.features_dir, f"{dataset.replace(':', '_').replace('/', '_')}_{split}_{key}.npz")
        if self.cfg.cache_features and os.path.isfile(path):
            cached = np.load(path)
            self.log(f"{split} features of {dataset} from {path}")
            return cached["features"], cached["labels"]
        total = count or (source.num_train if split == "train" else source.num_test)
        bar = keras.utils.Progbar(total, verbose=1 if sys.stderr.isatty() else 0, unit_name="image")
        self.log(f"extracting {split} features of {dataset} ({total} images) ...")
        feats, labels = knn.features_and_labels(
            enc.features, pipeline.eval_split(source, split, enc.image_size, self.cfg.eval_batch_size, keep),
            progress=lambda n: bar.update(min(n, total)), dim=enc.feature_dim)
        if self.cfg.cache_features:
            os.makedirs(self.run.features_dir, exist_ok=True)
            np.savez(path, features=feats, labels=labels, identity=json.dumps(identity))
        return feats, labels


def load_source(dataset, data_dir, class_list=""):
    """A data source the network can take (RGB or grey images)."""
    from cmsf_tf.data import sources

    source = sources.load(dataset, data_dir, class_list)
    shape = source.image_shape
    if shape is not None and shape[-1] not in (1, 3):
        raise UserError(f"{dataset} has images with {shape[-1]} channels; the network takes RGB "
                        "(grey images are replicated to 3 channels)")
    return source


def labelled_count(plan, source):
    if plan.labels is not None:
        return int(np.sum(np.asarray(plan.labels) >= 0))
    if plan.labelled is not None:
        return int(np.sum(plan.labelled))
    return len(plan.labelled_names) if plan.labelled_names else source.num_train

"""The cross-entropy baseline: the same backbone, data pipeline, optimizer and schedule as the mean-shift
methods, trained with a linear classifier on the (possibly noisy) training labels of the weak view.

Not a MeanShift (no target, bank or neighbours); it shares the training plumbing through the mixin,
so checkpoints, resume, summaries, the NaN guard and evaluation treat it like every other method. Its
backbone is `online_backbone`, which is what evaluation and export read. Unlabelled examples (label -1,
with --label_split) do not contribute to the loss.
"""

import keras
import tensorflow as tf

from cmsf_tf.data import augment
from cmsf_tf.methods.base import TrainingPlumbing
from cmsf_tf.models import backbones, heads


class CrossEntropy(TrainingPlumbing, keras.Model):
    needs_labels = True

    @classmethod
    def views(cls, cfg):
        return {"strong_view": False, "third_view": False, "multi_crop": None}  # trains on the weak view alone

    @classmethod
    def from_run_config(cls, cfg, *, sync_bn, num_images, num_classes):
        return cls(arch=cfg.arch, image_size=cfg.image_size, num_classes=num_classes, width=cfg.width,
                   weight_decay=cfg.weight_decay, sync_bn=sync_bn, label_smoothing=cfg.label_smoothing)

    def __init__(self, *, arch, image_size, num_classes, channels=3, width=64, weight_decay=1e-4, sync_bn=False,
                 label_smoothing=0.0, **kwargs):
        super().__init__(**kwargs)
        self.weight_decay = float(weight_decay)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.online_backbone = backbones.build_backbone(arch, image_size, channels, width, sync_bn, "online_backbone")
        feat = backbones.feature_dim(arch, width)
        # torchvision's ResNet classifier: nn.Linear default init.
        self.classifier = keras.layers.Dense(num_classes, kernel_initializer=heads.linear_kernel_init(),
                                             bias_initializer=heads.linear_bias_init(feat), name="classifier")
        self.classifier.build((None, feat))
        self._add_step_counter()
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.top1_tracker = keras.metrics.Mean(name="train_top1")
        self.true_top1_tracker = keras.metrics.Mean(name="train_top1_true")
        self.built = True

    @property
    def online_variables(self):
        return self.online_backbone.trainable_variables + self.classifier.trainable_variables

    @property
    def metrics(self):
        return [self.loss_tracker, self.top1_tracker, self.true_top1_tracker]

    def call(self, images, training=False):
        return self.online_backbone(images, training=training)

    def logits(self, images, training=False):
        return tf.cast(self.classifier(self.online_backbone(images, training=training)), tf.float32)

    def train_step(self, batch):
        batch = augment.model_views(batch)  # uint8 views -> normalised float, here on the accelerator
        labels = tf.cast(batch["label"], tf.int32)
        labelled = tf.cast(labels >= 0, tf.float32)
        safe = tf.maximum(labels, 0)
        variables = self.online_variables
        with tf.GradientTape() as tape:
            logits = self.logits(batch["weak"], training=True)
            targets = tf.one_hot(safe, self.num_classes)
            if self.label_smoothing:
                targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
            ce = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
            loss = tf.reduce_sum(ce * labelled) / tf.maximum(tf.reduce_sum(labelled), 1.0)
            scaled = self._scaled_total(loss, variables)
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.train_steps.assign_add(1)

        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        self.loss_tracker.update_state(loss)
        # Top-1 against the training labels (what it fits, noise included) and against the true labels.
        self.top1_tracker.update_state(tf.cast(predicted == labels, tf.float32), sample_weight=labelled)
        self.true_top1_tracker.update_state(tf.cast(predicted == tf.cast(batch["true_label"], tf.int32), tf.float32))
        return self._finish_logs({"loss": self.loss_tracker.result(), "train_top1": self.top1_tracker.result(),
                                  "train_top1_true": self.true_top1_tracker.result(),
                                  "lr": tf.cast(self.optimizer.learning_rate, tf.float32)})

"""ResNet backbones (channels-last), returning globally pooled features.

Written out rather than taken from keras.applications because the mean-shift methods need
synchronized BatchNorm across replicas, a small-image stem for 28-64 px inputs and a width multiplier
for CPU-sized demos; initialisation and BatchNorm settings follow torchvision, which the paper used.

Convolutions and BatchNorms are named as torchvision names their modules (`conv1`, `bn1`,
`layer2.0.conv1`, `layer2.0.downsample.0`, ...): that name is how cmsf_tf.convert maps weights to and
from PyTorch state_dicts, by structure rather than by the order layers happen to be created in. Names
change no computation and no checkpoint (checkpoints address layers by their place in the model).
"""

import keras
import tensorflow as tf

from cmsf_tf.models import ARCHS


def _conv_init():
    """torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), drawn independently per layer.

    A new initializer per layer, made when the network is built: a Keras initializer fixes its seed when
    it is constructed, so one shared instance gave every convolution of the same shape the same starting
    weights (and, constructed at import time, a seed that keras.utils.set_random_seed did not govern)."""
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


# torchvision's BatchNorm: momentum 0.1 (Keras: 0.9), eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def feature_dim(arch, width=64):
    kind, _, _ = ARCHS[arch]
    return width * 8 * (4 if kind == "bottleneck" else 1)


def build_backbone(arch, image_size, channels=3, width=64, sync_bn=False, name="backbone", portable=False):
    """A keras.Model mapping [B, S, S, C] float images (any S; `image_size` is the training crops') to
    [B, feature_dim] pooled features.
    `portable`: Keras' own BatchNormalization instead of the fused one (same variables in the same order,
    same inference outputs), so a saved .keras file loads without cmsf_tf (cmsf_tf.export)."""
    kind, stages, small_stem = ARCHS[arch]
    conv = _conv_factory()
    bn = _bn_factory(sync_bn, keras.layers.BatchNormalization if portable else BatchNormalization)

    # Any spatial size: the recipe's crops and --multi_crop's smaller ones pass the same network (global
    # pooling makes the features the same size); `image_size` is the size the network is built for.
    inputs = keras.Input((None, None, channels), name=f"{name}_images")
    if small_stem:
        x = conv(width, 3, 1, "conv1")(inputs)
        x = keras.layers.ReLU()(bn("bn1")(x))
    else:
        x = conv(width, 7, 2, "conv1")(inputs)
        x = keras.layers.ReLU()(bn("bn1")(x))
        x = keras.layers.ZeroPadding2D(1)(x)
        x = keras.layers.MaxPooling2D(3, 2)(x)
    block = _bottleneck if kind == "bottleneck" else _basic
    for stage, blocks in enumerate(stages):
        for i in range(blocks):
            stride = 2 if (stage > 0 and i == 0) else 1
            x = block(x, width * 2**stage, stride, conv, bn, f"layer{stage + 1}.{i}.")
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name=name)


def _conv_factory():
    def conv(filters, kernel, stride, name):
        # Explicit symmetric padding reproduces PyTorch's padding=k//2 for strided convs ("same" pads
        # asymmetrically in TF).
        def apply(x):
            if stride > 1 and kernel > 1:
                x = keras.layers.ZeroPadding2D(kernel // 2)(x)
                padding = "valid"
            else:
                padding = "same"
            return keras.layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False,
                                       kernel_initializer=_conv_init(), name=name)(x)
        return apply
    return conv


@keras.saving.register_keras_serializable(package="cmsf_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training-mode pass over float32 images is one fused kernel.

    Keras 3 computes batch norm from separate moment, subtract, multiply and add ops (and as many in
    the gradient); TensorFlow's FusedBatchNormV3 does the forward in one kernel and the backward in
    another. On the demo network it took the online forward + backward from 224 to 169 ms per batch
    of 256 (2 CPU cores; tools/bench_step.py). Same variables, same names, same moving-average update
    (biased batch variance, as Keras), so checkpoints and the synchronized/inference/mixed-precision
    paths (left to Keras) are unchanged; outputs agree with Keras' to float32 round-off (tested).
    """

    def call(self, inputs, training=None, mask=None):
        if (not (training and self.trainable) or self.synchronized or mask is not None or self.renorm
                or len(inputs.shape) != 4 or self.axis not in (-1, 3) or inputs.dtype != tf.float32
                or not (self.scale and self.center) or keras.backend.backend() != "tensorflow"):
            return super().call(inputs, training=training, mask=mask)
        y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=self.gamma, offset=self.beta, mean=tf.zeros_like(self.moving_mean),
            variance=tf.ones_like(self.moving_variance), epsilon=self.epsilon, exponential_avg_factor=1.0,
            data_format="NHWC", is_training=True)
        # The kernel returns the unbiased variance (n / (n - 1)); Keras' moving average uses the biased one.
        n = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
        variance = variance * tf.maximum(n - 1.0, 1.0) / n
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return y


def _bn_factory(sync_bn, layer=BatchNormalization):
    def bn(name, gamma_zero=False):
        return layer(
            momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, synchronized=sync_bn,
            gamma_initializer="zeros" if gamma_zero else "ones", name=name)
    return bn


def _shortcut(x, filters, stride, conv, bn, name):
    if stride == 1 and x.shape[-1] == filters:
        return x
    return bn(name + "downsample.1")(conv(filters, 1, stride, name + "downsample.0")(x))


def _basic(x, filters, stride, conv, bn, name):
    shortcut = _shortcut(x, filters, stride, conv, bn, name)
    y = keras.layers.ReLU()(bn(name + "bn1")(conv(filters, 3, stride, name + "conv1")(x)))
    y = bn(name + "bn2")(conv(filters, 3, 1, name + "conv2")(y))
    return keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))


def _bottleneck(x, filters, stride, conv, bn, name):
    shortcut = _shortcut(x, filters * 4, stride, conv, bn, name)
    y = keras.layers.ReLU()(bn(name + "bn1")(conv(filters, 1, 1, name + "conv1")(x)))
    y = keras.layers.ReLU()(bn(name + "bn2")(conv(filters, 3, stride, name + "conv2")(y)))  # stride on the 3x3, as torchvision
    y = bn(name + "bn3")(conv(filters * 4, 1, 1, name + "conv3")(y))
    return keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))

"""MLP heads: projection (backbone -> embedding), prediction (embedding -> embedding)."""

import keras


def linear_kernel_init():
    """PyTorch nn.Linear's default init (kaiming_uniform with a=sqrt(5)), so heads (and the xent classifier)
    start as in the paper; a new initializer per layer (a shared one would give layers of one shape the same
    weights: backbones.py)."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform")


def head_dims(feature_dim, hidden=0, out=0):
    """(hidden, out) of the projection head; 0 means proportional to ResNet-50's 2048->4096->512."""
    return (hidden or 2 * feature_dim), (out or max(feature_dim // 4, 16))


def mlp(in_dim, hidden, out, sync_bn=False, name="mlp"):
    """Linear - BN - ReLU - Linear, as in BYOL/MSF."""
    inputs = keras.Input((in_dim,), name=f"{name}_in")
    x = keras.layers.Dense(hidden, kernel_initializer=linear_kernel_init(),
                           bias_initializer=linear_bias_init(in_dim))(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=sync_bn)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(out, kernel_initializer=linear_kernel_init(),
                           bias_initializer=linear_bias_init(hidden))(x)
    return keras.Model(inputs, x, name=name)


def linear_bias_init(fan_in):
    """PyTorch nn.Linear's default bias init: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / fan_in**0.5
    return keras.initializers.RandomUniform(-bound, bound)

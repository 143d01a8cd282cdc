"""Backbones and heads: shapes and parameter counts against torchvision's."""

import numpy as np
import pytest

from cmsf_tf.models import backbones, heads


def n_params(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


@pytest.mark.parametrize("arch,size,count", [
    ("resnet50", 224, 23_508_032),   # torchvision resnet50 without fc
    ("resnet18", 224, 11_176_512),   # torchvision resnet18 without fc
])
def test_imagenet_backbones_match_torchvision_parameter_counts(arch, size, count):
    model = backbones.build_backbone(arch, size)
    assert n_params(model) == count
    assert model.output_shape == (None, backbones.feature_dim(arch))


def test_small_stem_keeps_resolution_and_width_scales():
    model = backbones.build_backbone("resnet18_small", 28, width=16)
    assert model.output_shape == (None, 128)
    out = model(np.zeros((2, 28, 28, 3), np.float32), training=False)
    assert out.shape == (2, 128)
    # First conv is 3x3 stride 1: the first stage runs at the input resolution.
    conv = [l for l in model.layers if l.__class__.__name__ == "Conv2D"][0]
    assert conv.kernel_size == (3, 3) and conv.strides == (1, 1)


def test_head_dims_are_proportional_to_resnet50():
    assert heads.head_dims(2048) == (4096, 512)
    assert heads.head_dims(512) == (1024, 128)
    assert heads.head_dims(512, 64, 32) == (64, 32)


def test_mlp_is_linear_bn_relu_linear():
    m = heads.mlp(2048, 4096, 512)
    kinds = [l.__class__.__name__ for l in m.layers[1:]]
    assert kinds == ["Dense", "BatchNormalization", "ReLU", "Dense"]
    assert m.output_shape == (None, 512)


def test_fused_batch_norm_matches_keras_in_training_mode():
    """The fused training path of backbones.BatchNormalization gives Keras' outputs, moving statistics
    and gradients (x, gamma, beta) to float32 round-off; inference and 2-d inputs use Keras' own path."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(1.5, 2.0, size=(6, 5, 4, 8)).astype(np.float32))
    gamma, beta = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    outs = []
    for cls in (keras.layers.BatchNormalization, backbones.BatchNormalization):
        layer = cls(momentum=0.9, epsilon=1e-5)
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.sin(tf.range(8, dtype=tf.float32)))
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        outs.append([y.numpy(), layer.moving_mean.numpy(), layer.moving_variance.numpy()]
                    + [g.numpy() for g in grads] + [layer(x, training=False).numpy()])
    keras_out, fused_out = outs
    for name, a, b in zip(["y", "moving_mean", "moving_variance", "dx", "dgamma", "dbeta", "inference"],
                          keras_out, fused_out):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)
    # the moving variance follows the biased batch variance, as Keras'
    want_var = 0.9 + 0.1 * x.numpy().reshape(-1, 8).var(axis=0)
    np.testing.assert_allclose(fused_out[2], want_var, rtol=1e-5)


def test_every_layer_draws_its_own_initial_weights():
    """torchvision initialises each layer independently. A Keras initializer fixes its seed when it is made,
    so a single shared one gave every convolution of one shape (and every Dense of one shape) the same
    starting weights."""
    backbone = backbones.build_backbone("resnet18_small", 16, width=4)
    kernels = [layer.kernel.numpy() for layer in backbone.layers if hasattr(layer, "kernel")]
    same_shape = [(a, b) for i, a in enumerate(kernels) for b in kernels[i + 1:] if a.shape == b.shape]
    assert len(same_shape) >= 15
    assert not any(np.array_equal(a, b) for a, b in same_shape)
    head, predictor = heads.mlp(32, 64, 8, name="projector"), heads.mlp(8, 64, 8, name="predictor")
    # projector and predictor end in Dense(64 -> 8) layers of one shape
    assert not np.array_equal(head.layers[-1].kernel.numpy(), predictor.layers[-1].kernel.numpy())
    # fan_out kaiming: std sqrt(2 / (k * k * out)) for the 3x3 convolutions of the last stage
    last = np.concatenate([k.ravel() for k in kernels if k.shape == (3, 3, 32, 32)])
    assert np.std(last) == pytest.approx(np.sqrt(2.0 / (9 * 32)), rel=0.05)


_INIT_PROGRAM = """
import sys
import numpy as np
import keras
if sys.argv[1] == "import_first":
    from cmsf_tf.models import backbones, heads
keras.utils.set_random_seed(3)
from cmsf_tf.models import backbones, heads
weights = backbones.build_backbone("resnet18_small", 16, width=4).weights + heads.mlp(32, 64, 8).weights
print(repr([float(np.asarray(w).astype(np.float64).sum()) for w in weights]))
"""


def test_initial_weights_follow_the_seed_whatever_was_imported_before(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "init.py"
    script.write_text(_INIT_PROGRAM)
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    outs = [subprocess.run([sys.executable, str(script), order], capture_output=True, text=True, timeout=300,
                           env=env) for order in ("import_first", "seed_first", "import_first")]
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout

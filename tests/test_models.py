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

"""A PyTorch ResNet with torchvision's module names and layout (conv1, bn1, layer1.0.conv1, ...,
layerN.0.downsample.0/1, fc), plus the two things cmsf_tf's backbones add: a width multiplier and the
3x3, stride-1, no-max-pool stem of resnet18_small. It is the PyTorch side of tests/test_convert.py and
tools/parity.py (torchvision itself is not needed, nor installable beside the CPU build of torch used here).

With width=64 and the standard stem, its state_dict has exactly torchvision.models.resnet18()/resnet50()'s
names and shapes.
"""

import torch
from torch import nn

# arch -> (bottleneck?, blocks per stage, small stem), as cmsf_tf.models.ARCHS
ARCHS = {"resnet50": (True, (3, 4, 6, 3), False), "resnet18": (False, (2, 2, 2, 2), False),
         "resnet18_small": (False, (2, 2, 2, 2), True)}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * 4, stride)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


def _downsample(inplanes, planes, stride):
    if stride == 1 and inplanes == planes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class ResNet(nn.Module):
    """num_classes=0: no classifier (forward returns the pooled features, as cmsf_tf's backbone)."""

    def __init__(self, arch="resnet50", width=64, num_classes=1000):
        super().__init__()
        bottleneck, blocks, small_stem = ARCHS[arch]
        block = Bottleneck if bottleneck else BasicBlock
        if small_stem:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for stage, count in enumerate(blocks):
            planes = width * 2**stage
            layers = []
            for i in range(count):
                layers.append(block(inplanes, planes, 2 if stage > 0 and i == 0 else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = inplanes
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else nn.Identity()
        for module in self.modules():  # torchvision's initialisation (BatchNorm: weight 1, bias 0 by default)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        """Pooled features before the classifier: what cmsf_tf's backbone returns."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def randomise(model, seed=0):
    """Random weights and random BatchNorm statistics (positive variances), so that a conversion that
    dropped or swapped any tensor shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("bn1.weight") or ".bn" in name or "downsample.1" in name:
                tensor.copy_(0.8 + 0.4 * torch.rand(tensor.shape, generator=generator))
            else:  # convolution and linear weights: He-scaled, so activations stay O(1) through 50 layers
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return model

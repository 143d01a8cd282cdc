"""The networks: backbones (ResNets) and heads (projector, predictor, classifiers).

`ARCHS` is the backbone registry (--arch name -> block kind, blocks per stage, small-image stem), kept here
without TensorFlow so that the command line checks --arch before TensorFlow loads.
"""

ARCHS = {
    "resnet50": ("bottleneck", (3, 4, 6, 3), False),
    "resnet18": ("basic", (2, 2, 2, 2), False),
    "resnet18_small": ("basic", (2, 2, 2, 2), True),
}

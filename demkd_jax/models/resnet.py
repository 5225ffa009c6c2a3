"""CIFAR ResNets (CRD/RepDistiller ``resnet*`` and ``resnet*x4``): 3 stages of basic blocks.

``features`` = (stem, layer1, layer2, layer3, pooled), post-activation as the reference.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from demkd_jax.models.layers import ConvBN, ConvOptions, ZooModel, dense, make_stages, run_stages, scale_channels

CONFIGS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


class BasicBlock(ConvOptions):
    features: int
    strides: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = self.conv_options
        out = nn.relu(ConvBN(self.features, 3, self.strides, name="conv_bn1", **kw)(x, train))
        out = ConvBN(self.features, 3, name="conv_bn2", **kw)(out, train)
        if self.downsample:
            x = ConvBN(self.features, 1, self.strides, name="downsample", **kw)(x, train)
        return nn.relu(out + x)


class ResNet(ZooModel):
    depth: int
    filters: Sequence[int]

    def setup(self):
        if (self.depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {self.depth}")
        filters = [scale_channels(f, self.width) for f in self.filters]
        self.stem = ConvBN(filters[0], 3, **self.conv_options)
        self.layers = make_stages(
            lambda _, cin, cout, s: BasicBlock(cout, s, downsample=(s != 1 or cin != cout), **self.conv_options),
            filters[0], zip(filters[1:], [(self.depth - 2) // 6] * 3, (1, 2, 2)))
        self.fc = dense(self.num_classes, filters[-1], init="torch", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x = nn.relu(self.stem(x.astype(self.dtype), train))
        return self.outputs([x, *run_stages(self.layers, x, train)])

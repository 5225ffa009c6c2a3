"""CIFAR ResNets (CRD/RepDistiller ``resnet*`` and ``resnet*x4``): 3 stages of basic blocks.

``features`` = (stem, layer1, layer2, layer3, pooled), post-activation as the reference.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models.layers import ConvBN, Dtype, dense, global_avg_pool, pooled_logits, run_stages, scale_channels

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


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    fold_bn: bool = False
    winograd: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn, winograd=self.winograd)
        out = nn.relu(ConvBN(self.features, 3, self.strides, name="conv_bn1", **kw)(x, train))
        out = ConvBN(self.features, 3, name="conv_bn2", **kw)(out, train)
        if self.downsample:
            x = ConvBN(self.features, 1, self.strides, name="downsample", **kw)(x, train)
        return nn.relu(out + x)


class ResNet(nn.Module):
    depth: int
    filters: Sequence[int]
    num_classes: int = 100
    width: float = 1.0
    dtype: Dtype = jnp.float32
    fold_bn: bool = False
    winograd: bool = False

    def setup(self):
        if (self.depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {self.depth}")
        n = (self.depth - 2) // 6
        filters = [scale_channels(f, self.width) for f in self.filters]
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn, winograd=self.winograd)
        self.stem = ConvBN(filters[0], 3, **kw)
        layers, in_planes = [], filters[0]
        for stage, planes in enumerate(filters[1:]):
            strides = 1 if stage == 0 else 2
            blocks = []
            for i in range(n):
                s = strides if i == 0 else 1
                blocks.append(BasicBlock(planes, s, downsample=(s != 1 or in_planes != planes), **kw))
                in_planes = planes
            layers.append(blocks)
        self.layers = layers
        self.fc = dense(self.num_classes, filters[-1], init="torch", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x, feats = run_stages(self.stem, self.layers, x, train, self.dtype)
        pooled = global_avg_pool(x)
        return self.fc(pooled).astype(jnp.float32), (*feats, pooled)

    def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
        del train
        return pooled_logits(self.fc, feature_map, self.dtype)

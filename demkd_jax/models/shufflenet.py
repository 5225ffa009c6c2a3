"""ShuffleNet V1 and V2 for CIFAR (CRD/RepDistiller ``ShuffleV1``, CA-MKD ``ShuffleV2``).

Both use a 1x1 stem at full resolution, as the reference. ``features`` = (stem, layer1, layer2, last map,
pooled); for ShuffleV2 the last map is relu(bn(conv 1x1 -> 1024)) (CA-MKD's layout, the map that is
pooled), for ShuffleV1 it is layer3's output.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models.layers import (ConvBN, ConvOptions, ZooModel, channel_shuffle, dense, make_stages, run_stages,
                                     scale_channels, torch_default_kernel)


_conv_bn = functools.partial(ConvBN, kernel_init=torch_default_kernel)


class ShuffleV1Bottleneck(ConvOptions):
    out_planes: int
    strides: int
    groups: int
    first_group_conv: bool  # False for the very first block (24-channel stem): g = 1 as the reference

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = self.conv_options
        mid = self.out_planes // 4
        g = self.groups if self.first_group_conv else 1
        out = nn.relu(_conv_bn(mid, 1, 1, g, name="conv_bn1", **kw)(x, train))
        out = channel_shuffle(out, g)
        out = nn.relu(_conv_bn(mid, 3, self.strides, mid, name="conv_bn2", **kw)(out, train))
        out = _conv_bn(self.out_planes, 1, 1, self.groups, name="conv_bn3", **kw)(out, train)
        if self.strides == 2:
            res = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
            return nn.relu(jnp.concatenate([out, res], axis=-1))
        return nn.relu(out + x)


class ShuffleNetV1(ZooModel):
    out_planes: Sequence[int] = (240, 480, 960)
    num_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3
    classifier_attr = "linear"

    def setup(self):
        # Multiples of 4 * groups keep every grouped conv and the concatenation consistent at any width.
        stem = scale_channels(24, self.width, 4 * self.groups)
        planes = [scale_channels(p, self.width, 4 * self.groups) for p in self.out_planes]
        self.stem = _conv_bn(stem, 1, **self.conv_options)

        def block(stage, cin, cout, s):  # a stage's first block (stride 2) concatenates its input to its own output
            return ShuffleV1Bottleneck(cout - cin if s == 2 else cout, s, self.groups,
                                       first_group_conv=stage > 0 or s == 1, **self.conv_options)

        self.layers = make_stages(block, stem, zip(planes, self.num_blocks, (2, 2, 2)))
        self.linear = dense(self.num_classes, planes[-1], init="torch", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x = nn.relu(self.stem(x.astype(self.dtype), train))
        return self.outputs([x, *run_stages(self.layers, x, train)])


class ShuffleV2Block(ConvOptions):
    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = self.conv_options
        c = self.channels // 2
        x1, x2 = x[..., :c], x[..., c:]
        out = nn.relu(_conv_bn(c, 1, name="conv_bn1", **kw)(x2, train))
        out = _conv_bn(c, 3, 1, c, name="conv_bn2", **kw)(out, train)
        out = nn.relu(_conv_bn(c, 1, name="conv_bn3", **kw)(out, train))
        return channel_shuffle(jnp.concatenate([x1, out], axis=-1), 2)


class ShuffleV2DownBlock(ConvOptions):
    in_channels: int
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = self.conv_options
        mid = self.out_channels // 2
        left = _conv_bn(self.in_channels, 3, 2, self.in_channels, name="conv_bn1", **kw)(x, train)
        left = nn.relu(_conv_bn(mid, 1, name="conv_bn2", **kw)(left, train))
        right = nn.relu(_conv_bn(mid, 1, name="conv_bn3", **kw)(x, train))
        right = _conv_bn(mid, 3, 2, mid, name="conv_bn4", **kw)(right, train)
        right = nn.relu(_conv_bn(mid, 1, name="conv_bn5", **kw)(right, train))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(ZooModel):
    out_channels: Sequence[int] = (116, 232, 464, 1024)
    num_blocks: Sequence[int] = (3, 7, 3)
    classifier_attr = "linear"

    def setup(self):
        kw = self.conv_options
        stem = scale_channels(24, self.width, 2)
        channels = [scale_channels(c, self.width, 2) for c in self.out_channels]
        self.stem = _conv_bn(stem, 1, **kw)
        layers, in_channels = [], stem
        for out, n in zip(channels[:3], self.num_blocks):
            layers.append([ShuffleV2DownBlock(in_channels, out, **kw)] + [ShuffleV2Block(out, **kw) for _ in range(n)])
            in_channels = out
        self.layers = layers
        self.conv_last = _conv_bn(channels[3], 1, **kw)
        self.linear = dense(self.num_classes, channels[3], init="torch", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x = nn.relu(self.stem(x.astype(self.dtype), train))
        maps = run_stages(self.layers, x, train)
        return self.outputs([x, maps[0], maps[1], nn.relu(self.conv_last(maps[2], train))])

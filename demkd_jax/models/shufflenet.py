"""ShuffleNet V1 and V2 for CIFAR (CRD/RepDistiller ``ShuffleV1``, CA-MKD ``ShuffleV2``).

Both use a 1x1 stem at full resolution, as the reference. ``features`` = (stem, layer1, layer2, last map,
pooled); for ShuffleV2 the last map is relu(bn(conv 1x1 -> 1024)) (CA-MKD's layout, the map that is
pooled), for ShuffleV1 it is layer3's output.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models.layers import (
    ConvBN,
    Dtype,
    channel_shuffle,
    dense,
    global_avg_pool,
    pooled_logits,
    run_stages,
    scale_channels,
    torch_default_kernel,
)


def _conv_bn(features, kernel_size, strides=1, groups=1, *, dtype, fold_bn, name):
    return ConvBN(features, kernel_size, strides, groups, kernel_init=torch_default_kernel, dtype=dtype,
                  fold_bn=fold_bn, name=name)


class ShuffleV1Bottleneck(nn.Module):
    in_planes: int
    out_planes: int
    strides: int
    groups: int
    first_group_conv: bool  # False for the very first block (24-channel stem): g = 1 as the reference
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn)
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


class ShuffleNetV1(nn.Module):
    out_planes: Sequence[int] = (240, 480, 960)
    num_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3
    num_classes: int = 100
    width: float = 1.0
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn)
        # Multiples of 4 * groups keep every grouped conv and the concatenation consistent at any width.
        stem = scale_channels(24, self.width, 4 * self.groups)
        planes = [scale_channels(p, self.width, 4 * self.groups) for p in self.out_planes]
        self.stem = _conv_bn(stem, 1, name=None, **kw)
        layers, in_planes = [], stem
        for stage, (out, n) in enumerate(zip(planes, self.num_blocks)):
            blocks = []
            for i in range(n):
                cat = in_planes if i == 0 else 0
                blocks.append(ShuffleV1Bottleneck(in_planes, out - cat, 2 if i == 0 else 1, self.groups,
                                                  first_group_conv=not (stage == 0 and i == 0), **kw))
                in_planes = out
            layers.append(blocks)
        self.layers = layers
        self.linear = dense(self.num_classes, planes[-1], init="torch", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x, feats = run_stages(self.stem, self.layers, x, train, self.dtype)
        pooled = global_avg_pool(x)
        return self.linear(pooled).astype(jnp.float32), (*feats, pooled)

    def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
        del train
        return pooled_logits(self.linear, feature_map, self.dtype)


class ShuffleV2Block(nn.Module):
    channels: int
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn)
        c = self.channels // 2
        x1, x2 = x[..., :c], x[..., c:]
        out = nn.relu(_conv_bn(c, 1, name="conv_bn1", **kw)(x2, train))
        out = _conv_bn(c, 3, 1, c, name="conv_bn2", **kw)(out, train)
        out = nn.relu(_conv_bn(c, 1, name="conv_bn3", **kw)(out, train))
        return channel_shuffle(jnp.concatenate([x1, out], axis=-1), 2)


class ShuffleV2DownBlock(nn.Module):
    in_channels: int
    out_channels: int
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn)
        mid = self.out_channels // 2
        left = _conv_bn(self.in_channels, 3, 2, self.in_channels, name="conv_bn1", **kw)(x, train)
        left = nn.relu(_conv_bn(mid, 1, name="conv_bn2", **kw)(left, train))
        right = nn.relu(_conv_bn(mid, 1, name="conv_bn3", **kw)(x, train))
        right = _conv_bn(mid, 3, 2, mid, name="conv_bn4", **kw)(right, train)
        right = nn.relu(_conv_bn(mid, 1, name="conv_bn5", **kw)(right, train))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    out_channels: Sequence[int] = (116, 232, 464, 1024)
    num_blocks: Sequence[int] = (3, 7, 3)
    num_classes: int = 100
    width: float = 1.0
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn)
        stem = scale_channels(24, self.width, 2)
        channels = [scale_channels(c, self.width, 2) for c in self.out_channels]
        self.stem = _conv_bn(stem, 1, name=None, **kw)
        layers, in_channels = [], stem
        for out, n in zip(channels[:3], self.num_blocks):
            layers.append([ShuffleV2DownBlock(in_channels, out, **kw)] + [ShuffleV2Block(out, **kw) for _ in range(n)])
            in_channels = out
        self.layers = layers
        self.conv_last = _conv_bn(channels[3], 1, name=None, **kw)
        self.linear = dense(self.num_classes, channels[3], init="torch", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x = nn.relu(self.stem(x.astype(self.dtype), train))
        feats = [x]
        for blocks in self.layers[:2]:
            for block in blocks:
                x = block(x, train)
            feats.append(x)
        for block in self.layers[2]:
            x = block(x, train)
        x = nn.relu(self.conv_last(x, train))
        pooled = global_avg_pool(x)
        logits = self.linear(pooled).astype(jnp.float32)
        return logits, (*feats, x, pooled)

    def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
        del train
        return pooled_logits(self.linear, feature_map, self.dtype)

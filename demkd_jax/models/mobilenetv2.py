"""MobileNetV2 for CIFAR as in CRD/RepDistiller (``MobileNetV2`` = ``mobile_half``: expansion 6, width 0.5).

``features`` = (stem, blocks[1], blocks[2], blocks[4], blocks[6], pooled) as the reference; the last map
(2x2x160 at 32x32 input) precedes the 1x1 conv to 1280 channels, so :meth:`MobileNetV2.head` applies that
conv, the pool and the classifier.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models.layers import ConvBN, Dtype, dense, global_avg_pool, scale_channels

# expansion t, channels c, repeats n, stride s (before width scaling)
SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    in_channels: int
    out_channels: int
    strides: int
    expansion: int
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn)
        hidden = self.in_channels * self.expansion
        out = nn.relu(ConvBN(hidden, 1, name="expand", **kw)(x, train))
        out = nn.relu(ConvBN(hidden, 3, self.strides, hidden, name="depthwise", **kw)(out, train))
        out = ConvBN(self.out_channels, 1, name="project", **kw)(out, train)
        if self.strides == 1 and self.in_channels == self.out_channels:
            return x + out
        return out


class MobileNetV2(nn.Module):
    expansion: int = 6
    width_mult: float = 0.5
    num_classes: int = 100
    width: float = 1.0
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, fold_bn=self.fold_bn)
        w = self.width_mult * self.width
        in_channels = max(1, int(32 * w))
        self.stem = ConvBN(in_channels, 3, 2, **kw)
        blocks = []
        for t, c, n, s in SETTING:
            out = max(1, int(c * w))
            t = t if t == 1 else self.expansion
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(in_channels, out, s if i == 0 else 1, t, **kw))
                in_channels = out
            blocks.append(stage)
        self.blocks = blocks
        last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        last = scale_channels(last, self.width)
        self.conv_last = ConvBN(last, 1, **kw)
        self.classifier = dense(self.num_classes, last, init="normal_0.01", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x = nn.relu(self.stem(x.astype(self.dtype), train))
        feats = [x]
        for i, stage in enumerate(self.blocks):
            for block in stage:
                x = block(x, train)
            if i in (1, 2, 4, 6):
                feats.append(x)
        pooled = self._pool(x, train)
        return self.classifier(pooled).astype(jnp.float32), (*feats, pooled)

    def _pool(self, feature_map: jax.Array, train: bool) -> jax.Array:
        return global_avg_pool(nn.relu(self.conv_last(feature_map, train)))

    def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
        """Logits from ``features[-2]`` (1x1 conv to 1280 + BN + ReLU, pool, classifier)."""
        return self.classifier(self._pool(feature_map.astype(self.dtype), train)).astype(jnp.float32)

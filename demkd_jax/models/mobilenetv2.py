"""MobileNetV2 for CIFAR as in CRD/RepDistiller (``MobileNetV2`` = ``mobile_half``: expansion 6, width 0.5).

``features`` = (stem, blocks[1], blocks[2], blocks[4], blocks[6], pooled) as the reference; the last map
(2x2x160 at 32x32 input) precedes the 1x1 conv to 1280 channels, so :meth:`MobileNetV2.head` applies that
conv, the pool and the classifier.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models.layers import (ConvBN, ConvOptions, ZooModel, dense, global_avg_pool, make_stages, run_stages,
                                     scale_channels)

# expansion t, channels c, repeats n, stride s (before width scaling)
SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(ConvOptions):
    in_channels: int
    out_channels: int
    strides: int
    expansion: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = self.conv_options
        hidden = self.in_channels * self.expansion
        out = nn.relu(ConvBN(hidden, 1, name="expand", **kw)(x, train))
        out = nn.relu(ConvBN(hidden, 3, self.strides, hidden, name="depthwise", **kw)(out, train))
        out = ConvBN(self.out_channels, 1, name="project", **kw)(out, train)
        if self.strides == 1 and self.in_channels == self.out_channels:
            return x + out
        return out


class MobileNetV2(ZooModel):
    expansion: int = 6
    width_mult: float = 0.5
    classifier_attr = "classifier"

    def setup(self):
        kw = self.conv_options
        w = self.width_mult * self.width
        stem = max(1, int(32 * w))
        self.stem = ConvBN(stem, 3, 2, **kw)
        expansion = [t if t == 1 else self.expansion for t, _, _, _ in SETTING]
        self.blocks = make_stages(lambda stage, cin, cout, s: InvertedResidual(cin, cout, s, expansion[stage], **kw),
                                  stem, [(max(1, int(c * w)), n, s) for _, c, n, s in SETTING])
        last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        last = scale_channels(last, self.width)
        self.conv_last = ConvBN(last, 1, **kw)
        self.classifier = dense(self.num_classes, last, init="normal_0.01", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x = nn.relu(self.stem(x.astype(self.dtype), train))
        maps = run_stages(self.blocks, x, train)
        pooled = self._pool(maps[-1], train)
        return self.classifier(pooled).astype(jnp.float32), (x, maps[1], maps[2], maps[4], maps[6], pooled)

    def _pool(self, feature_map: jax.Array, train: bool) -> jax.Array:
        return global_avg_pool(nn.relu(self.conv_last(feature_map, train)))

    def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
        """Logits from ``features[-2]`` (1x1 conv to 1280 + BN + ReLU, pool, classifier)."""
        return self.classifier(self._pool(feature_map.astype(self.dtype), train)).astype(jnp.float32)

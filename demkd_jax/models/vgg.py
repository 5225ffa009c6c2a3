"""VGG with BatchNorm for CIFAR (CRD/RepDistiller ``vgg*_bn``; the zoo names drop the ``_bn``).

Five stages of 3x3 conv(bias)->BN->ReLU, max-pooled between stages, global average pool, one linear
classifier. ``features`` = (f0, f1, f2, f3, f4, pooled) as the reference's ``is_feat=True`` list.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models.layers import (
    ConvBN,
    Dtype,
    dense,
    global_avg_pool,
    pooled_logits,
    he_normal_fan_out,
    max_pool_2x2,
    scale_channels,
)

CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
    stages: Sequence[Sequence[int]]
    num_classes: int = 100
    width: float = 1.0
    dtype: Dtype = jnp.float32
    fold_bn: bool = False
    winograd: bool = False

    def setup(self):
        self.blocks = [
            [
                ConvBN(scale_channels(c, self.width), 3, conv_bias=True, kernel_init=he_normal_fan_out,
                       dtype=self.dtype, fold_bn=self.fold_bn, winograd=self.winograd)
                for c in stage
            ]
            for stage in self.stages
        ]
        last = scale_channels(self.stages[-1][-1], self.width)
        self.classifier = dense(self.num_classes, last, init="normal_0.01", dtype=self.dtype)

    def _stage(self, i: int, x: jax.Array, train: bool) -> jax.Array:
        for j, layer in enumerate(self.blocks[i]):
            x = layer(x, train)
            x = nn.relu(x)
        return x

    def __call__(self, x: jax.Array, train: bool = True):
        input_size = x.shape[1]
        x = x.astype(self.dtype)
        f0 = self._stage(0, x, train)
        x = max_pool_2x2(f0)
        f1 = self._stage(1, x, train)
        x = max_pool_2x2(f1)
        f2 = self._stage(2, x, train)
        x = max_pool_2x2(f2)
        f3 = self._stage(3, x, train)
        x = max_pool_2x2(f3) if input_size == 64 else f3  # as the reference: no 4th pool at 32x32
        f4 = self._stage(4, x, train)
        pooled = global_avg_pool(f4)
        logits = self.classifier(pooled).astype(jnp.float32)
        return logits, (f0, f1, f2, f3, f4, pooled)

    def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
        """Logits from ``features[-2]`` (pool + classifier)."""
        del train
        return pooled_logits(self.classifier, feature_map, self.dtype)

"""Wide ResNets for CIFAR (CRD/RepDistiller ``wrn_d_k``), pre-activation blocks.

``features`` = (stem conv, block1, block2, relu(bn(block3)), pooled): CA-MKD's layout, in which the
last map is the one that is pooled.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models.layers import (
    ConvBN,
    Dtype,
    batch_norm,
    conv,
    dense,
    global_avg_pool,
    pooled_logits,
    scale_channels,
)

CONFIGS: dict[str, tuple[int, int]] = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


class WideBasicBlock(nn.Module):
    features: int
    strides: int
    equal_in_out: bool
    dtype: Dtype = jnp.float32
    fold_bn: bool = False
    winograd: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pre = nn.relu(batch_norm(train, self.dtype, name="bn1")(x))
        # conv1 -> bn2 is a conv->BN pair (foldable); bn1 follows the residual sum and stays.
        out = nn.relu(ConvBN(self.features, 3, self.strides, dtype=self.dtype, fold_bn=self.fold_bn,
                             winograd=self.winograd, name="conv1_bn2")(pre, train))
        out = conv(self.features, 3, dtype=self.dtype, winograd=self.winograd, name="conv2")(out)
        if self.equal_in_out:
            return x + out
        shortcut = conv(self.features, 1, self.strides, dtype=self.dtype, name="shortcut")(pre)
        return shortcut + out


class WideResNet(nn.Module):
    depth: int
    widen_factor: int
    num_classes: int = 100
    width: float = 1.0
    dtype: Dtype = jnp.float32
    fold_bn: bool = False
    winograd: bool = False

    def setup(self):
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        w = self.widen_factor
        channels = [scale_channels(c, self.width) for c in (16, 16 * w, 32 * w, 64 * w)]
        self.stem = conv(channels[0], 3, dtype=self.dtype)
        blocks, in_planes = [], channels[0]
        for stage, planes in enumerate(channels[1:]):
            strides = 1 if stage == 0 else 2
            stage_blocks = []
            for i in range(n):
                stage_blocks.append(WideBasicBlock(planes, strides if i == 0 else 1, in_planes == planes,
                                                   dtype=self.dtype, fold_bn=self.fold_bn,
                                                   winograd=self.winograd))
                in_planes = planes
            blocks.append(stage_blocks)
        self.blocks = blocks
        self.bn = batch_norm(None, self.dtype)
        self.fc = dense(self.num_classes, channels[-1], init="torch_zero_bias", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x = self.stem(x.astype(self.dtype))
        feats = [x]
        for stage, stage_blocks in enumerate(self.blocks):
            for block in stage_blocks:
                x = block(x, train)
            if stage < 2:
                feats.append(x)
        x = nn.relu(self.bn(x, use_running_average=not train))
        pooled = global_avg_pool(x)
        logits = self.fc(pooled).astype(jnp.float32)
        return logits, (*feats, x, pooled)

    def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
        del train
        return pooled_logits(self.fc, feature_map, self.dtype)

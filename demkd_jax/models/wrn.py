"""Wide ResNets for CIFAR (CRD/RepDistiller ``wrn_d_k``), pre-activation blocks.

``features`` = (stem conv, block1, block2, relu(bn(block3)), pooled): CA-MKD's layout, in which the
last map is the one that is pooled.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from demkd_jax.models.layers import (ConvBN, ConvOptions, ZooModel, batch_norm, conv, dense, make_stages, run_stages,
                                     scale_channels)

CONFIGS: dict[str, tuple[int, int]] = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


class WideBasicBlock(ConvOptions):
    features: int
    strides: int
    equal_in_out: bool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pre = nn.relu(batch_norm(train, self.dtype, name="bn1")(x))
        # conv1 -> bn2 is a conv->BN pair (foldable); bn1 follows the residual sum and stays.
        out = nn.relu(ConvBN(self.features, 3, self.strides, name="conv1_bn2", **self.conv_options)(pre, train))
        out = conv(self.features, 3, dtype=self.dtype, winograd=self.winograd, name="conv2")(out)
        if self.equal_in_out:
            return x + out
        return conv(self.features, 1, self.strides, dtype=self.dtype, name="shortcut")(pre) + out


class WideResNet(ZooModel):
    depth: int
    widen_factor: int

    def setup(self):
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
        w = self.widen_factor
        channels = [scale_channels(c, self.width) for c in (16, 16 * w, 32 * w, 64 * w)]
        self.stem = conv(channels[0], 3, dtype=self.dtype)
        self.blocks = make_stages(lambda _, cin, cout, s: WideBasicBlock(cout, s, cin == cout, **self.conv_options),
                                  channels[0], zip(channels[1:], [(self.depth - 4) // 6] * 3, (1, 2, 2)))
        self.bn = batch_norm(None, self.dtype)
        self.fc = dense(self.num_classes, channels[-1], init="torch_zero_bias", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        x = self.stem(x.astype(self.dtype))
        maps = run_stages(self.blocks, x, train)
        return self.outputs([x, maps[0], maps[1], nn.relu(self.bn(maps[2], use_running_average=not train))])

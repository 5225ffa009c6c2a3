"""VGG with BatchNorm for CIFAR (CRD/RepDistiller ``vgg*_bn``; the zoo names drop the ``_bn``).

Five stages of 3x3 conv(bias)->BN->ReLU, max-pooled between stages, global average pool, one linear
classifier. ``features`` = (f0, f1, f2, f3, f4, pooled) as the reference's ``is_feat=True`` list.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from demkd_jax.models.layers import ConvBN, ZooModel, dense, max_pool_2x2, scale_channels

CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(ZooModel):
    stages: Sequence[Sequence[int]]
    classifier_attr = "classifier"

    def setup(self):
        self.blocks = [[ConvBN(scale_channels(c, self.width), 3, conv_bias=True, **self.conv_options) for c in stage]
                       for stage in self.stages]
        last = scale_channels(self.stages[-1][-1], self.width)
        self.classifier = dense(self.num_classes, last, init="normal_0.01", dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = True):
        input_size = x.shape[1]
        x = x.astype(self.dtype)
        feats = []
        for i, stage in enumerate(self.blocks):
            if 0 < i < 4 or (i == 4 and input_size == 64):  # as the reference: no 4th pool at 32x32
                x = max_pool_2x2(x)
            for layer in stage:
                x = nn.relu(layer(x, train))
            feats.append(x)
        return self.outputs(feats)

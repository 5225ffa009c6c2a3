"""Building blocks shared by the CIFAR model zoo.

Conventions (match the PyTorch reference zoo of CRD/RepDistiller and CA-MKD):
- NHWC activations, HWIO kernels, explicit symmetric padding (PyTorch's ``padding=k//2``; Flax's
  ``"SAME"`` pads asymmetrically for stride 2 and would not match).
- BatchNorm: momentum 0.9 in Flax terms (PyTorch 0.1), epsilon 1e-5.
- ``dtype`` is the computation dtype; parameters are always float32.
- ``winograd=True`` computes eligible 3x3 convolutions (stride 1, small maps) with Winograd F(2x2, 3x3)
  (:mod:`demkd_jax.models.winograd`); parameters are unchanged.
- ``fold_bn=True`` builds the inference form of a conv->BN pair: a single convolution with bias whose
  weights come from :func:`demkd_jax.models.fold_batchnorm`. Used for frozen teachers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models import winograd as winograd_lib

Dtype = Any
Initializer = Callable[..., jax.Array]

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# PyTorch initialisations, expressed as Flax initializers.
# normal(0, sqrt(2 / (k*k*out_channels))): RepDistiller's VGG/WRN/MobileNetV2 init and kaiming_normal_(fan_out).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d/Linear weight init: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def scale_channels(channels: int, width: float, divisor: int = 1) -> int:
    """Channel count scaled by ``width`` and rounded to a positive multiple of ``divisor``."""
    if width == 1.0:
        return channels
    return max(divisor, int(round(channels * width / divisor)) * divisor)


def batch_norm(train: bool | None, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
    """PyTorch-equivalent BatchNorm; ``train=None`` leaves the mode to be passed at call time."""
    return nn.BatchNorm(use_running_average=None if train is None else not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


def conv(features: int, kernel_size: int, strides: int = 1, *, groups: int = 1, use_bias: bool = False,
         kernel_init: Initializer = he_normal_fan_out, bias_init: Initializer = nn.initializers.zeros,
         dtype: Dtype = jnp.float32, winograd: bool = False, name: str | None = None) -> nn.Conv:
    """A bare convolution with PyTorch's symmetric ``padding=k//2``."""
    pad = (kernel_size - 1) // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                   dtype=dtype, param_dtype=jnp.float32, name=name,
                   conv_general_dilated=winograd_lib.conv_general_dilated if winograd else None)


class ConvOptions(nn.Module):
    """Base of the zoo's modules: the keyword-only options every convolution takes (see the module docstring)."""

    _: dataclasses.KW_ONLY
    dtype: Dtype = jnp.float32
    fold_bn: bool = False
    winograd: bool = False

    @property
    def conv_options(self) -> dict:
        return dict(dtype=self.dtype, fold_bn=self.fold_bn, winograd=self.winograd)


class ConvBN(ConvOptions):
    """Convolution followed by BatchNorm (no activation), or their folded inference form.

    Parameters live under ``conv`` and ``bn`` so that the pair can be found and folded generically.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    groups: int = 1
    conv_bias: bool = False
    kernel_init: Initializer = he_normal_fan_out

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(self.features, self.kernel_size, self.strides, groups=self.groups,
                 use_bias=self.conv_bias or self.fold_bn, kernel_init=self.kernel_init, dtype=self.dtype,
                 winograd=self.winograd, name="conv")(x)
        return x if self.fold_bn else batch_norm(train, self.dtype, name="bn")(x)


def dense(features: int, fan_in: int, *, init: str, dtype: Dtype = jnp.float32) -> nn.Dense:
    """The classifier layer with one of the reference zoo's initialisations.

    ``init``: ``"normal_0.01"`` (VGG, MobileNetV2: N(0, 0.01), zero bias), ``"torch"`` (PyTorch default,
    ResNet/ShuffleNet), ``"torch_zero_bias"`` (WRN: default weight, zero bias).
    """
    if init == "normal_0.01":
        kernel_init, bias_init = nn.initializers.normal(0.01), nn.initializers.zeros
    elif init == "torch":
        kernel_init, bias_init = torch_default_kernel, torch_default_bias(fan_in)
    elif init == "torch_zero_bias":
        kernel_init, bias_init = torch_default_kernel, nn.initializers.zeros
    else:
        raise ValueError(f"unknown classifier init {init!r}")
    return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, param_dtype=jnp.float32)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H and W. The reference's fixed-size average pools are global at CIFAR resolution."""
    return jnp.mean(x, axis=(1, 2))


class ZooModel(ConvOptions):
    """Base of the zoo's classifiers: ``(logits, features)`` from ``__call__``, logits from ``head``."""

    _: dataclasses.KW_ONLY
    num_classes: int = 100
    width: float = 1.0
    classifier_attr: ClassVar[str] = "fc"  # the classifier's attribute, hence parameter, name

    def outputs(self, feats: Sequence[jax.Array]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """float32 logits and ``(*feats, pooled)``: the last map of ``feats`` pooled and classified."""
        pooled = global_avg_pool(feats[-1])
        return getattr(self, self.classifier_attr)(pooled).astype(jnp.float32), (*feats, pooled)

    def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
        """Logits from ``features[-2]`` (pool + classifier)."""
        del train
        return self.outputs([feature_map.astype(self.dtype)])[0]


def make_stages(block: Callable[[int, int, int, int], nn.Module], in_channels: int,
                stages: Iterable[tuple[int, int, int]]) -> list[list[nn.Module]]:
    """``block(stage, in_channels, out_channels, strides)`` for each ``(out_channels, count, strides)`` of ``stages``:
    the first block of a stage changes the width and takes the stride, the others keep both."""
    layers = []
    for stage, (out, count, strides) in enumerate(stages):
        layers.append([block(stage, out if i else in_channels, out, 1 if i else strides) for i in range(count)])
        in_channels = out
    return layers


def run_stages(stages: Sequence[Sequence[Callable]], x: jax.Array, train: bool) -> list[jax.Array]:
    """Each stage's blocks in turn; returns the map after every stage."""
    maps = []
    for blocks in stages:
        for block in blocks:
            x = block(x, train)
        maps.append(x)
    return maps


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2/stride-2 max pooling as a reshape and a max: same forward as ``nn.max_pool``, but its gradient
    is a fused elementwise mask instead of XLA's select-and-scatter, which the CPU backend expands into
    scatters (about a tenth of a VGG training step). At exact ties the gradient is shared between the tied
    inputs (a valid subgradient; PyTorch gives it to the first)."""
    n, h, w, c = x.shape
    return jnp.max(x[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet channel shuffle on NHWC, identical to the reference's NCHW view/permute."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)

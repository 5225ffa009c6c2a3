"""The CIFAR model zoo of CRD/RepDistiller and CA-MKD, as pure Flax modules.

``create_model(name)`` returns a ``flax.linen`` module; ``model.apply(variables, x, train=...)`` on NHWC
input returns ``(logits, features)`` with ``features[-2]`` the last feature map before pooling and
``features[-1]`` the pooled vector. ``model.apply(variables, feature_map, method="head")`` maps
``features[-2]`` to logits (CA-MKD applies teachers' heads to projected student features).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from demkd_jax.models import mobilenetv2, resnet, shufflenet, vgg, wrn
from demkd_jax.models.connectors import Connector, StackedConnector, resize_feature_map
from demkd_jax.models.layers import BN_EPSILON

__all__ = ["MODEL_NAMES", "PARAM_COUNTS", "create_model", "init_variables", "feature_shapes", "count_params",
           "fold_batchnorm", "Connector", "StackedConnector", "resize_feature_map"]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(vgg.VGG, stages) for name, stages in vgg.CONFIGS.items()},
    **{name: functools.partial(resnet.ResNet, *config) for name, config in resnet.CONFIGS.items()},
    **{name: functools.partial(wrn.WideResNet, *config) for name, config in wrn.CONFIGS.items()},
    "ShuffleV1": shufflenet.ShuffleNetV1,
    "ShuffleV2": shufflenet.ShuffleNetV2,
    "MobileNetV2": mobilenetv2.MobileNetV2,
}
MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)

# Trainable parameters for 100 classes of the PyTorch reference (docs/method.md §5).
PARAM_COUNTS: dict[str, int] = {
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "ShuffleV1": 949_258, "ShuffleV2": 1_355_528, "MobileNetV2": 812_836,
}


def create_model(
    name: str,
    num_classes: int = 100,
    dtype: Any = jnp.float32,
    *,
    width: float = 1.0,
    fold_bn: bool = False,
    winograd: bool = False,
) -> nn.Module:
    """Builds a zoo model by its reference name.

    Args:
      name: one of :data:`MODEL_NAMES` (e.g. ``"vgg8"``, ``"wrn_40_2"``, ``"ShuffleV2"``).
      num_classes: classifier width.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      width: channel multiplier (1.0 = the reference architecture; smaller for fast tests).
      fold_bn: build the inference form with every conv->BN pair folded into one biased conv
        (use with :func:`fold_batchnorm`; for frozen teachers).
      winograd: compute the 3x3 stride-1 convolutions of small feature maps with Winograd F(2x2, 3x3)
        (:mod:`demkd_jax.models.winograd`; same parameters). ShuffleNets and MobileNetV2 have no such
        convolution (theirs are depthwise), so it changes nothing there.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model name {name!r}; expected one of: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return _FACTORIES[name](num_classes=num_classes, width=width, dtype=jnp.dtype(dtype), fold_bn=fold_bn,
                            winograd=winograd)


def init_variables(model: nn.Module, rng: jax.Array, image_size: int = 32, batch_size: int = 2):
    """Initial ``{'params', 'batch_stats'}`` for a model on NHWC images of the given size."""
    x = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
    return model.init(rng, x, train=False)


def feature_shapes(model: nn.Module, image_shape: tuple[int, int, int] = (32, 32, 3)) -> list:
    """Shapes of ``model``'s feature maps and pooled vector at batch 2 (``jax.eval_shape``: traced, not compiled)."""
    x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)  # no array: nothing runs, nothing compiles
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False)[0][1], x)


def count_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def fold_batchnorm(variables: dict) -> dict:
    """Folds every eval-mode conv->BN pair into a single biased convolution.

    Returns variables for ``create_model(name, fold_bn=True)``: for each ``ConvBN``,
    ``kernel * s`` and ``(bias - mean) * s + beta`` with ``s = scale / sqrt(var + eps)``. BatchNorms that do
    not follow a convolution (WRN's pre-activation BNs) keep their statistics.
    """
    def fold(p: dict, s: dict) -> tuple[dict, dict]:
        if set(p) == {"conv", "bn"}:
            conv, bn, bn_stats = p["conv"], p["bn"], s["bn"]
            scale = bn["scale"] * jax.lax.rsqrt(bn_stats["var"] + BN_EPSILON)
            bias = conv.get("bias", jnp.zeros_like(bn["bias"]))
            folded = {"kernel": conv["kernel"] * scale, "bias": (bias - bn_stats["mean"]) * scale + bn["bias"]}
            return {"conv": folded}, {}
        if not all(isinstance(v, dict) for v in p.values()):  # a leaf module: conv, dense or standalone BN
            return p, s
        new_p, new_s = {}, {}
        for key, value in p.items():
            new_p[key], sub_s = fold(value, s.get(key, {}))
            if sub_s:
                new_s[key] = sub_s
        return new_p, new_s

    params, stats = fold(variables["params"], variables.get("batch_stats", {}))
    return {"params": params, "batch_stats": stats} if stats else {"params": params}

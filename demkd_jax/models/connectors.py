"""Student-to-teacher feature connectors: one small 1x1-convolution projection per teacher (CA-MKD's ``Embed``).

DE-MKD's and CA-MKD's feature terms compare each teacher's map with the student's map through that teacher's
connector; the connectors train with the student.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models.layers import batch_norm, conv, torch_default_bias, torch_default_kernel


def resize_feature_map(x: jax.Array, out_size: int | Sequence[int]) -> jax.Array:
    """Resizes an NHWC map to ``out_size`` (int or (H, W)) spatially, per axis.

    A larger axis is average-pooled with window = stride = ratio, which is PyTorch's
    ``adaptive_avg_pool2d`` for an integer ratio (a non-integer ratio raises ValueError). A smaller axis is
    then upsampled bilinearly, half-pixel centres: PyTorch's ``F.interpolate(mode="bilinear",
    align_corners=False)``.
    """
    chex.assert_rank(x, 4)
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else map(int, out_size)
    b, h, w, c = x.shape
    if min(out_h, out_w) < 1:
        raise ValueError(f"out_size must be positive, got {(out_h, out_w)}")

    def ratio(n: int, o: int) -> int:
        if n <= o:
            return 1
        if n % o:
            raise ValueError(
                f"cannot average-pool a {h}x{w} feature map to {out_h}x{out_w}: {n} is not a multiple of {o}"
            )
        return n // o

    rh, rw = ratio(h, out_h), ratio(w, out_w)
    if rh > 1 or rw > 1:
        x = nn.avg_pool(x, (rh, rw), strides=(rh, rw))
    if x.shape[1:3] != (out_h, out_w):
        # Only upsampling is left here, where jax.image.resize's antialiasing does nothing.
        x = jax.image.resize(x, (b, out_h, out_w, c), method="bilinear")
    return x


class Connector(nn.Module):
    """Student-to-teacher feature connector r_k: resize -> 1x1 conv (with bias) -> BatchNorm -> ReLU.

    Resizes the student map to the teacher's spatial size (:func:`resize_feature_map`), then projects to
    the teacher's ``out_channels`` as CA-MKD's ``Embed`` (1x1 conv with PyTorch's default init, BN with
    momentum 0.9 in Flax terms and eps 1e-5), followed by a ReLU (``use_relu=False`` drops it).
    ``dtype`` is the computation dtype; parameters are float32.

    ``connector.apply(variables, student_map[B, H, W, C_s], train=True, mutable=["batch_stats"])``
    returns ``[B, out_size, out_size, out_channels]`` (and the updated statistics).
    """

    out_channels: int
    out_size: int | tuple[int, int]
    dtype: Any = jnp.float32
    use_relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        chex.assert_rank(x, 4)
        x = resize_feature_map(x.astype(self.dtype), self.out_size)
        x = conv(self.out_channels, 1, use_bias=True, kernel_init=torch_default_kernel,
                 bias_init=torch_default_bias(x.shape[-1]), dtype=self.dtype, name="conv")(x)
        x = batch_norm(None, self.dtype, name="bn")(x, use_running_average=not train)
        return nn.relu(x) if self.use_relu else x


class StackedConnector(Connector):
    """K connectors for K teachers of one architecture, with variables stacked on a leading axis.

    ``nn.vmap`` of :class:`Connector` over the teacher axis (params and batch_stats stacked on axis 0,
    independent initialisations); one student map ``[B, H, W, C_s]`` in, ``[K, B, out_size, out_size,
    out_channels]`` out. Slicing the variables at ``k`` gives a plain ``Connector``'s variables.
    """

    _: dataclasses.KW_ONLY
    num_teachers: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        stacked = nn.vmap(
            Connector,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.num_teachers,
        )
        return stacked(self.out_channels, self.out_size, self.dtype, self.use_relu, name="connector")(x, train)

"""Winograd F(2x2, 3x3) convolution for 3x3 / stride 1 / padding 1 layers (Lavin & Gray, 2016).

Each 2x2 output tile comes from a 4x4 input tile with 16 multiplications per channel pair instead of 36: the
input tiles are transformed (``B^T d B``), multiplied with the transformed kernel (``G g G^T``) as 16 batched
matrix products over channels, and transformed back (``A^T m A``). The transforms are memory-bound passes, so
the 2.25x fewer multiply-adds pay only on small maps with many channels (:func:`pays_off`; measurements in
benchmarks/README.md). Results equal the direct convolution up to float rounding (about 1e-6 relative).
Parameters keep ``nn.Conv``'s HWIO layout, so checkpoints do not depend on the algorithm; gradients flow
through the same formulation (the backward pass is again batched matrix products).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# F(2x2, 3x3): input transform B^T (4x4), kernel transform G (4x3), output transform A^T (2x4).
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
TILE, IN_TILE = 2, 4


def _lincomb(coeffs, arrays):
    """sum_i c_i a_i over the non-zero coefficients, without multiplications by +-1 (fuses into one pass)."""
    out = None
    for c, a in zip(coeffs, arrays):
        if c == 0:
            continue
        term = a if c == 1 else (-a if c == -1 else a * jnp.asarray(c, a.dtype))
        out = term if out is None else out + term
    return out


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO 3x3 kernel -> [16, C_in, C_out] transformed kernel ``G g G^T``."""
    rows = [_lincomb(G[a], [kernel[i] for i in range(3)]) for a in range(IN_TILE)]  # [3 (w), C_in, C_out]
    return jnp.stack([_lincomb(G[b], [r[j] for j in range(3)]) for r in rows for b in range(IN_TILE)])


def conv3x3(x: jax.Array, kernel: jax.Array, *, precision=None) -> jax.Array:
    """Same as ``lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))`` in NHWC/HWIO."""
    n, h, w, c = x.shape
    if kernel.shape[:3] != (3, 3, c):
        raise ValueError(f"winograd conv3x3 needs a (3, 3, {c}, C_out) kernel, got {kernel.shape}")
    th, tw = -(-h // TILE), -(-w // TILE)
    hp, wp = th * TILE + 2, tw * TILE + 2
    xp = jnp.pad(x, ((0, 0), (1, hp - h - 1), (1, wp - w - 1), (0, 0)))
    # Input transform, separably: rows, then columns, with strided slices (tile t, offset i -> 2t + i).
    rows = [jax.lax.slice(xp, (0, i, 0, 0), (n, i + (th - 1) * TILE + 1, wp, c), (1, TILE, 1, 1))
            for i in range(IN_TILE)]
    transformed = []
    for alpha in range(IN_TILE):
        r = _lincomb(B_T[alpha], rows)
        cols = [jax.lax.slice(r, (0, 0, j, 0), (n, th, j + (tw - 1) * TILE + 1, c), (1, 1, TILE, 1))
                for j in range(IN_TILE)]
        transformed.extend(_lincomb(B_T[beta], cols) for beta in range(IN_TILE))
    v = jnp.stack(transformed).reshape(IN_TILE * IN_TILE, n * th * tw, c)
    u = transform_kernel(kernel).astype(v.dtype)
    # Materialise both operands: XLA's CPU backend would otherwise fuse the transforms into the matrix
    # product and emit a naive loop nest instead of calling its GEMM library.
    v, u = jax.lax.optimization_barrier((v, u))
    m = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)  # [16, P, C_out]
    m = m.reshape(IN_TILE, IN_TILE, n, th, tw, -1)
    flat = [m[a, b] for a in range(IN_TILE) for b in range(IN_TILE)]
    out = jnp.stack([
        jnp.stack([_lincomb([A_T[mu, a] * A_T[nu, b] for a in range(IN_TILE) for b in range(IN_TILE)], flat)
                   for nu in range(TILE)])
        for mu in range(TILE)])  # [2 (mu), 2 (nu), n, th, tw, C_out]
    out = out.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * TILE, tw * TILE, -1)
    return out[:, :h, :w]


# Where Winograd pays on CPU: 3x3 layers on maps of at most SMALL_MAP with at least MIN_CHANNELS input channels.
# With fewer channels the 16 small matrix products run far from the GEMM peak; larger maps with 64 channels gain
# alone but not inside a model, where XLA fuses those stages' direct convolutions into one faster subgraph.
SMALL_MAP = 8
MIN_CHANNELS = 128


def pays_off(height: int, width: int, in_channels: int) -> bool:
    """Whether a 3x3 stride-1 convolution of this input map goes faster as Winograd F(2x2, 3x3)."""
    return max(height, width) <= SMALL_MAP and in_channels >= MIN_CHANNELS


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)``: Winograd where it applies.

    Applies to a 3x3 kernel, stride 1, padding 1, no dilation or groups, NHWC/HWIO, where :func:`pays_off`;
    everything else goes to ``lax.conv_general_dilated`` unchanged.
    """
    eligible = (
        rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
        and [tuple(p) for p in padding] == [(1, 1), (1, 1)]
        and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
        and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
        and feature_group_count == 1 and not kwargs
        and pays_off(lhs.shape[1], lhs.shape[2], rhs.shape[2])
        and dimension_numbers is not None and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
        and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
    )
    if not eligible:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    return conv3x3(lhs, rhs, precision=precision)

"""The on-device input pipeline: pure JAX functions of arrays and keys, meant to run inside ``jax.jit``.

Everything is a function of ``(key, step)``, so a run is reproducible and resumes exactly from any step;
the design and a usage sketch are in docs/data.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps per epoch, ``num_examples // batch_size`` (the last short batch is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_examples < batch_size:
        raise ValueError(
            f"num_examples={num_examples} is smaller than batch_size={batch_size}: an epoch has no full batch"
        )
    return num_examples // batch_size


def epoch_permutation(key: jax.Array, epoch: jax.Array | int, num_examples: int) -> jax.Array:
    """Epoch ``epoch``'s order: a permutation of ``range(num_examples)`` (int32) from ``fold_in(key, epoch)``."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples).astype(jnp.int32)


def batch_indices_from_permutation(permutation: jax.Array, step: jax.Array | int, batch_size: int) -> jax.Array:
    """int32 ``[batch_size]`` indices of global step ``step``, given its epoch's :func:`epoch_permutation`.

    Step ``step`` of epoch ``step // spe`` (``spe`` = :func:`steps_per_epoch`) takes slice ``step % spe``.
    """
    spe = steps_per_epoch(permutation.shape[0], batch_size)
    position = jnp.asarray(step).astype(jnp.int32) % spe
    return jax.lax.dynamic_slice_in_dim(permutation, position * batch_size, batch_size)


def crop_and_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, padding: int) -> jax.Array:
    """Deterministic crop and flip: the core of :func:`random_crop_flip`.

    Output ``[b, i, j]`` is pixel ``(offsets[b, 0] + i, offsets[b, 1] + j')`` of the image zero-padded by
    ``padding`` on each side, where ``j' = W - 1 - j`` if ``flips[b]`` else ``j`` (crop, then flip the
    crop). ``offsets`` int ``[B, 2]`` in ``[0, 2 * padding]``; ``flips`` bool ``[B]``. Keeps the dtype.
    """
    b, h, w, _ = images.shape
    dy = offsets[:, 0].astype(jnp.int32) - padding
    dx = offsets[:, 1].astype(jnp.int32) - padding
    rows = jnp.arange(h, dtype=jnp.int32)[None, :] + dy[:, None]  # [B, H] source rows
    cols = jnp.arange(w, dtype=jnp.int32)[None, :]
    cols = jnp.where(flips[:, None], w - 1 - cols, cols) + dx[:, None]  # [B, W] source columns
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    out = jnp.take_along_axis(images, jnp.clip(rows, 0, h - 1)[:, :, None, None], axis=1)
    out = jnp.take_along_axis(out, jnp.clip(cols, 0, w - 1)[:, None, :, None], axis=2)
    return jnp.where(inside[..., None], out, jnp.zeros((), images.dtype))


def random_crop_flip(images: jax.Array, key: jax.Array, padding: int = 4, flip: bool = True) -> jax.Array:
    """Random crop (zero padding ``padding``, same output size) and, if ``flip``, random horizontal flip.

    Each example draws its own offsets, uniform in ``[0, 2 * padding]`` per axis, and a fair coin.
    """
    b = images.shape[0]
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * padding + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,)) if flip else jnp.zeros((b,), bool)
    return crop_and_flip(images, offsets, flips, padding)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``(images / 255 - mean) / std`` per channel, in ``dtype`` (computed in float32)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    scale = 1.0 / (255.0 * std)
    return (images.astype(jnp.float32) * scale - mean / std).astype(dtype)


def augment(images: jax.Array, key: jax.Array, mean: jax.Array, std: jax.Array, *, padding: int = 4, flip: bool = True,
            dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Training augmentation of a uint8 ``[B, H, W, 3]`` batch: :func:`random_crop_flip`, :func:`normalize`."""
    return normalize(random_crop_flip(images, key, padding, flip), mean, std, dtype)


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """``ceil(num_examples / batch_size)``: the batches that cover every example once."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-num_examples // batch_size)


def eval_batch_indices(batch: jax.Array | int, num_examples: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Indices int32 ``[batch_size]`` and mask bool ``[batch_size]`` of evaluation batch ``batch``.

    Batch ``i`` covers examples ``i * batch_size ...`` in order; positions past ``num_examples`` point at
    example 0 and have mask False (weight them out of every sum).
    """
    idx = jnp.asarray(batch).astype(jnp.int32) * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    mask = idx < num_examples
    return jnp.where(mask, idx, 0), mask

"""Distillation losses and teacher weights of DE-MKD and its baselines (docs/method.md §2, §4).

Logits are float ``[B, C]``, labels int ``[B]``; teacher-stacked arrays carry the teacher axis first (``[K, B, C]``,
``[K, B, H, W, C]``, weights ``[K, B]``). Per-example losses return ``[B]``, multi-teacher losses a scalar. Teacher
logits, features and weights are constants for the gradient. ``temperature``, ``alpha``, ``beta``, ``tau`` may be
Python floats or traced scalars; ``scheme``, ``kind`` and ``reduction`` are static strings. How inputs are checked
and why the losses stay finite: docs/method.md §2 ("Numerics").
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

Scalar = float | jax.Array

WEIGHT_SCHEMES: tuple[str, ...] = ("camkd", "softmax", "ebkd", "uniform")
LOGIT_LOSS_KINDS: tuple[str, ...] = ("dkd", "kd")
TEACHER_REDUCTIONS: tuple[str, ...] = ("sum", "mean")


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _scalar(x: Scalar, name: str) -> jax.Array:
    x = _f32(x)
    if x.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {x.shape}")
    return x


def _positive(x: Scalar, name: str) -> jax.Array:
    """A scalar that must be > 0 (a temperature divides the logits): checked when it is concrete."""
    checked = _scalar(x, name)
    if not isinstance(x, jax.core.Tracer) and not float(np.asarray(x)) > 0:
        raise ValueError(f"{name} must be > 0, got {float(np.asarray(x))!r}")
    return checked


def _check_float_logits(*logits: jax.Array) -> None:
    for z in logits:
        if not jnp.issubdtype(jnp.result_type(z), jnp.floating):
            raise TypeError(f"logits must be floating point, got dtype {jnp.result_type(z)}")


def _check_pair(student_logits: jax.Array, teacher_logits: jax.Array) -> None:
    chex.assert_rank([student_logits, teacher_logits], 2)
    chex.assert_equal_shape([student_logits, teacher_logits])
    _check_float_logits(student_logits, teacher_logits)


def _check_labels(labels: jax.Array, batch: int, num_classes: int, *, min_classes: int = 1) -> None:
    chex.assert_rank(labels, 1)
    chex.assert_type(labels, int)
    chex.assert_shape(labels, (batch,))
    if num_classes < min_classes:
        raise ValueError(f"need at least {min_classes} classes, got logits with C = {num_classes}")
    if not isinstance(labels, jax.core.Tracer) and batch:
        values = np.asarray(labels)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels span [{low}, {high}], expected them in [0, {num_classes - 1}] "
                             f"(C = {num_classes} classes)")


def _check_teachers(teacher_logits: jax.Array, what: str, *, min_teachers: int = 1) -> None:
    chex.assert_rank(teacher_logits, 3)
    k = teacher_logits.shape[0]
    if k < min_teachers:
        raise ValueError(f"{what} needs at least {min_teachers} teachers (it divides by K - 1), got K = {k}")


def _reduce_teachers(weighted: jax.Array, reduction: str) -> jax.Array:
    """``[K, B]`` weighted per-teacher losses -> scalar: mean over the batch of the sum (or mean) over teachers."""
    if reduction not in TEACHER_REDUCTIONS:
        raise ValueError(f"unknown teacher reduction {reduction!r}; expected one of: {', '.join(TEACHER_REDUCTIONS)}")
    per_example = jnp.sum(weighted, axis=0)
    if reduction == "mean":
        per_example = per_example / weighted.shape[0]
    return jnp.mean(per_example)


def _logsumexp_excluding(z: jax.Array, mask: jax.Array) -> jax.Array:
    """log sum_{c: not mask} exp(z_c) over the last axis; needs at least one unmasked entry. The masked entries are
    -inf *before* exp: exp is exactly 0 there with derivative 0 (not inf * 0), and ``jnp.where`` sends a zero
    cotangent to the masked logits."""
    z_nt = jnp.where(mask, -jnp.inf, z)
    m = jax.lax.stop_gradient(jnp.max(z_nt, axis=-1, keepdims=True))
    return m[..., 0] + jnp.log(jnp.sum(jnp.exp(z_nt - m), axis=-1))


def _target_logit_margin(z: jax.Array, mask: jax.Array) -> jax.Array:
    """d = z_y − logsumexp_{c != y} z_c, so that p_y = softmax(z)_y = sigmoid(d) exactly: finite for finite z, it
    carries the binary (target / non-target) distribution without forming p_y."""
    z_t = jnp.sum(jnp.where(mask, z, 0.0), axis=-1)
    return z_t - _logsumexp_excluding(z, mask)


def _non_target_log_probs(z: jax.Array, mask: jax.Array) -> jax.Array:
    """log p̂ over the non-target classes; the target entry is set to 0 (a finite placeholder)."""
    log_p_hat = z - _logsumexp_excluding(z, mask)[..., None]
    # The raw target entry z_t - lse_nt can be huge (exp overflows); a finite 0 keeps the KL's masked
    # term at exactly 0 with zero gradient.
    return jnp.where(mask, 0.0, log_p_hat)


def _kl_from_logs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) = sum p (log p - log q) over the last axis, from finite log-probabilities."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy CE(z, y) = -log softmax(z)_y, in float32. ``[B, C], [B] -> [B]``."""
    chex.assert_rank(logits, 2)
    _check_float_logits(logits)
    _check_labels(labels, logits.shape[0], logits.shape[1])
    log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
    return -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]


def kd(student_logits: jax.Array, teacher_logits: jax.Array, temperature: Scalar) -> jax.Array:
    """Vanilla KD per example: KD = T² · KL(p_t ‖ p_s), p = softmax(z / T). ``[B, C] x 2 -> [B]``."""
    _check_pair(student_logits, teacher_logits)
    t = _positive(temperature, "temperature")
    log_ps = jax.nn.log_softmax(_f32(student_logits) / t, axis=-1)
    log_pt = jax.nn.log_softmax(jax.lax.stop_gradient(_f32(teacher_logits)) / t, axis=-1)
    return t**2 * _kl_from_logs(log_pt, log_ps)


def _decoupled_inputs(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, temperature: Scalar
                      ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The checked inputs of TCKD/NCKD: ``(z_s / T, z_t / T, target mask [B, C], T)``, the teacher's a constant."""
    _check_pair(student_logits, teacher_logits)
    _check_labels(labels, *student_logits.shape, min_classes=2)
    t = _positive(temperature, "temperature")
    mask = jax.nn.one_hot(labels, student_logits.shape[-1], dtype=jnp.bool_)
    return _f32(student_logits) / t, jax.lax.stop_gradient(_f32(teacher_logits)) / t, mask, t


def tckd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, temperature: Scalar) -> jax.Array:
    """Target-class KD (DKD) per example: TCKD = T² · KL(b_t ‖ b_s), b = [p_y, 1 − p_y], p = softmax(z/T).

    ``[B, C] x 2, [B] -> [B]``; needs C >= 2.
    """
    z_s, z_t, mask, t = _decoupled_inputs(student_logits, teacher_logits, labels, temperature)
    d_s, d_t = _target_logit_margin(z_s, mask), _target_logit_margin(z_t, mask)
    # With b = sigmoid(d), KL(b_teacher || b_student) is the Bregman divergence of softplus: finite for any finite d,
    # and for a small TCKD about 10x less float32 cancellation than the two-term sum over {target, non-target}.
    kl = jax.nn.softplus(d_s) - jax.nn.softplus(d_t) - jax.nn.sigmoid(d_t) * (d_s - d_t)
    return t**2 * kl


def nckd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, temperature: Scalar) -> jax.Array:
    """Non-target-class KD (DKD) per example: NCKD = T² · KL(p̂_t ‖ p̂_s).

    p̂ = softmax of z/T over the C − 1 non-target classes (the target class removed exactly, not by a
    finite offset). ``[B, C] x 2, [B] -> [B]``; needs C >= 2.
    """
    z_s, z_t, mask, t = _decoupled_inputs(student_logits, teacher_logits, labels, temperature)
    log_ps, log_pt = _non_target_log_probs(z_s, mask), _non_target_log_probs(z_t, mask)
    # Both placeholders are 0 at the target, so its term is exp(0) * (0 - 0) = 0 exactly.
    return t**2 * _kl_from_logs(log_pt, log_ps)


def dkd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, alpha: Scalar, beta: Scalar,
        temperature: Scalar) -> jax.Array:
    """Decoupled KD per example: DKD = α · TCKD + β · NCKD (Zhao et al., CVPR 2022). ``-> [B]``.

    With α = β = 1 this is not KD: KD = TCKD + (1 − p_y^teacher) · NCKD.
    """
    return (_scalar(alpha, "alpha") * tckd(student_logits, teacher_logits, labels, temperature)
            + _scalar(beta, "beta") * nckd(student_logits, teacher_logits, labels, temperature))


def entropy(logits: jax.Array, temperature: Scalar = 1.0) -> jax.Array:
    """Entropy (natural log) of q = softmax(z / T) over the last axis: H = −Σ_c q_c log q_c. ``[..., C] -> [...]``.

    Differentiable (no stop_gradient): it is a plain function of its input.
    """
    if jnp.ndim(logits) < 1:
        raise ValueError(f"entropy needs logits with a class axis, got a scalar of shape {jnp.shape(logits)}")
    _check_float_logits(logits)
    t = _positive(temperature, "temperature")
    log_q = jax.nn.log_softmax(_f32(logits) / t, axis=-1)
    return -jnp.sum(jnp.exp(log_q) * log_q, axis=-1)


def entropy_weights(teacher_logits: jax.Array, scheme: str = "camkd", temperature: Scalar = 1.0,
                    tau: Scalar = 1.0) -> jax.Array:
    """Per-example teacher weights from the entropy H_k of each teacher's prediction at T_w = ``temperature``,
    lower entropy, larger weight (docs/method.md §2). ``[K, B, C] -> [K, B]``, constants for the gradient.

    ``"camkd"`` (default) and ``"softmax"`` sum to 1 over the teachers, ``"ebkd"`` (not renormalised) to K − 1;
    both need K >= 2. When every teacher is one-hot (Σ_j H_j = 0, not only 0/0 in float32) ebkd takes the ratio
    H_k / Σ_j H_j as 1/K.
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown weight scheme {scheme!r}; expected one of: {', '.join(WEIGHT_SCHEMES)}")
    _check_teachers(teacher_logits, f"entropy_weights(scheme={scheme!r})",
                    min_teachers=2 if scheme in ("camkd", "ebkd") else 1)
    k = teacher_logits.shape[0]
    if scheme == "uniform":
        return jnp.full(teacher_logits.shape[:2], 1.0 / k, jnp.float32)
    h = entropy(jax.lax.stop_gradient(_f32(teacher_logits)), temperature)  # [K, B]
    if scheme == "camkd":
        return (1.0 - jax.nn.softmax(h, axis=0)) / (k - 1)
    if scheme == "softmax":
        return jax.nn.softmax(-h / _positive(tau, "tau"), axis=0)
    # "ebkd". A total below the smallest normal float may be flushed to 0 on some backends: treat as 0.
    total = jnp.sum(h, axis=0, keepdims=True)
    ok = total > jnp.finfo(jnp.float32).tiny
    ratio = jnp.where(ok, h / jnp.where(ok, total, 1.0), 1.0 / k)
    return 1.0 - ratio


def _confidence_weights(logits: jax.Array, labels: jax.Array, what: str, stop_gradient: bool) -> jax.Array:
    _check_teachers(logits, what, min_teachers=2)
    _check_labels(labels, *logits.shape[1:])
    logits = jax.lax.stop_gradient(_f32(logits)) if stop_gradient else _f32(logits)
    ce = jax.vmap(cross_entropy, in_axes=(0, None))(logits, labels)  # [K, B]
    return (1.0 - jax.nn.softmax(ce, axis=0)) / (logits.shape[0] - 1)


def confidence_weights(teacher_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """CA-MKD's label-based teacher weights w_k = (1 − softmax_k(CE(z_k, y))) / (K − 1), constants for the gradient.

    ``[K, B, C], [B] -> [K, B]``; Σ_k w_k = 1; needs K >= 2.
    """
    return _confidence_weights(teacher_logits, labels, "confidence_weights", stop_gradient=True)


def camkd_feature_weights(head_logits: jax.Array, labels: jax.Array, *, stop_gradient: bool = True) -> jax.Array:
    """CA-MKD's feature-loss teacher weights: :func:`confidence_weights` of ``head_logits [K, B, C]``.

    ``head_logits[k]`` is teacher k's classifier head applied to the projected student feature r_k(f_s)
    (``teacher.apply(vars_k, projected[k], method="head")``). CA-MKD's code lets the gradient flow through these
    weights into the student and the connectors (``stop_gradient=False``, method ``camkd``'s default).
    """
    return _confidence_weights(head_logits, labels, "camkd_feature_weights", stop_gradient)


def multi_teacher_logit_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                             weights: jax.Array, *, kind: str = "dkd", alpha: Scalar = 1.0, beta: Scalar = 8.0,
                             temperature: Scalar = 4.0, reduction: str = "sum") -> jax.Array:
    """Weighted multi-teacher logit loss L = mean_x Σ_k w_k(x) · ℓ(z_s(x), z_k(x), y). Scalar.

    ``kind="dkd"``: ℓ = DKD(α, β, T) (DE-MKD); ``kind="kd"``: ℓ = KD(T) (AVER, EBKD, CA-MKD baselines;
    ``labels``, ``alpha`` and ``beta`` are then unused). ``reduction="mean"`` divides the sum over teachers by K.
    """
    if kind not in LOGIT_LOSS_KINDS:
        raise ValueError(f"unknown logit loss kind {kind!r}; expected one of: {', '.join(LOGIT_LOSS_KINDS)}")
    chex.assert_rank(student_logits, 2)
    _check_teachers(teacher_logits, "multi_teacher_logit_loss")
    chex.assert_shape(teacher_logits, (None, *student_logits.shape))
    chex.assert_shape(weights, teacher_logits.shape[:2])
    _check_labels(labels, *student_logits.shape)
    if kind == "dkd":
        per_teacher = jax.vmap(lambda z_k: dkd(student_logits, z_k, labels, alpha, beta, temperature))
    else:
        per_teacher = jax.vmap(lambda z_k: kd(student_logits, z_k, temperature))
    return _reduce_teachers(jax.lax.stop_gradient(_f32(weights)) * per_teacher(teacher_logits), reduction)


def feature_mse(student_projected: jax.Array, teacher_features: jax.Array, weights: jax.Array, *,
                reduction: str = "sum", detach_weights: bool = True) -> jax.Array:
    """Weighted multi-teacher feature loss L_feat = mean_x Σ_k w_k(x) · mean_{h,w,c} (r_k(f_s) − f_k)². Scalar.

    ``student_projected[k]`` = r_k(f_s), the student map through teacher k's connector, ``[K, B, H, W, C]``.
    ``reduction="mean"`` divides the sum over teachers by K. The weights are constants for the gradient unless
    ``detach_weights=False`` (CA-MKD's feature term, whose weights depend on the student).
    """
    chex.assert_rank([student_projected, teacher_features], 5)
    chex.assert_equal_shape([student_projected, teacher_features])
    chex.assert_shape(weights, student_projected.shape[:2])
    diff = _f32(student_projected) - jax.lax.stop_gradient(_f32(teacher_features))
    per = jnp.mean(jnp.square(diff), axis=(2, 3, 4))  # [K, B]
    w = _f32(weights)
    if detach_weights:
        w = jax.lax.stop_gradient(w)
    return _reduce_teachers(w * per, reduction)


def fitnet_hint_loss(student_projected: jax.Array, teacher_hints: jax.Array) -> jax.Array:
    """FitNet-MKD hint loss: (1/K) Σ_k mean_{b,h,w,c} (r_k(f_s) − f_k)². Scalar.

    ``[K, B, H, W, C] x 2``; the hints are constants for the gradient. The trainer applies the weight λ (100,
    docs/method.md §4).
    """
    chex.assert_rank([student_projected, teacher_hints], 5)
    chex.assert_equal_shape([student_projected, teacher_hints])
    diff = _f32(student_projected) - jax.lax.stop_gradient(_f32(teacher_hints))
    return jnp.mean(jnp.mean(jnp.square(diff), axis=(1, 2, 3, 4)))

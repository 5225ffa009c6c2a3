"""Tests for demkd_jax.losses against float64 NumPy transcriptions of docs/method.md §2 and §4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demkd_jax import losses as L
from demkd_jax import models
from demkd_jax.models import create_model, init_variables
from demkd_jax.models.layers import BN_EPSILON, BN_MOMENTUM

B, C, K, T = 8, 10, 3, 4.0
ALPHA, BETA = 1.0, 8.0
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True)


# --------------------------------------------------------------------------------------------------------
# Float64 NumPy references, written from the formulas, not from the implementation.


def np_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def np_kd(s, t, temp):
    return temp**2 * np_kl(np_softmax(t / temp), np_softmax(s / temp))


def np_target_prob(z, y, temp):
    return np_softmax(z / temp)[np.arange(len(y)), y]


def np_tckd(s, t, y, temp):
    ps, pt = np_target_prob(s, y, temp), np_target_prob(t, y, temp)
    bs = np.stack([ps, 1.0 - ps], axis=-1)
    bt = np.stack([pt, 1.0 - pt], axis=-1)
    return temp**2 * np_kl(bt, bs)


def np_non_target(z, y, temp):
    """p̂: the C - 1 non-target probabilities renormalised (the target column removed)."""
    p = np_softmax(z / temp)
    keep = np.ones_like(p, bool)
    keep[np.arange(len(y)), y] = False
    p_nt = p[keep].reshape(len(y), -1)
    return p_nt / p_nt.sum(-1, keepdims=True)


def np_nckd(s, t, y, temp):
    return temp**2 * np_kl(np_non_target(t, y, temp), np_non_target(s, y, temp))


def np_dkd(s, t, y, alpha, beta, temp):
    return alpha * np_tckd(s, t, y, temp) + beta * np_nckd(s, t, y, temp)


def np_entropy(z, temp=1.0):
    q = np_softmax(np.asarray(z, np.float64) / temp)
    return -np.sum(q * np.log(q), axis=-1)


def np_entropy_weights(tz, scheme, temp=1.0, tau=1.0):
    h = np_entropy(tz, temp)  # [K, B]
    k = h.shape[0]
    if scheme == "camkd":
        return (1.0 - np_softmax(h, axis=0)) / (k - 1)
    if scheme == "softmax":
        return np_softmax(-h / tau, axis=0)
    if scheme == "ebkd":
        return 1.0 - h / h.sum(0, keepdims=True)
    assert scheme == "uniform"
    return np.full(h.shape, 1.0 / k)


def np_cross_entropy(z, y):
    return -np.log(np_softmax(z)[np.arange(len(y)), y])


def np_confidence_weights(tz, y):
    ce = np.stack([np_cross_entropy(z, y) for z in tz])
    return (1.0 - np_softmax(ce, axis=0)) / (len(tz) - 1)


def np_multi_teacher(s, tz, y, w, kind, alpha, beta, temp):
    if kind == "dkd":
        per = np.stack([np_dkd(s, t, y, alpha, beta, temp) for t in tz])
    else:
        per = np.stack([np_kd(s, t, temp) for t in tz])
    return np.mean(np.sum(w * per, axis=0))


def np_block_mean(x, r):
    b, h, w, c = x.shape
    return x.reshape(b, h // r, r, w // r, r, c).mean(axis=(2, 4))


def np_bilinear_torch(x, out_h, out_w):
    """PyTorch F.interpolate(mode='bilinear', align_corners=False) on NHWC, upsampling."""
    _, h, w, _ = x.shape

    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    h0, h1, lh = taps(h, out_h)
    w0, w1, lw = taps(w, out_w)
    lh, lw = lh[None, :, None, None], lw[None, None, :, None]
    top = x[:, h0][:, :, w0] * (1 - lw) + x[:, h0][:, :, w1] * lw
    bottom = x[:, h1][:, :, w0] * (1 - lw) + x[:, h1][:, :, w1] * lw
    return top * (1 - lh) + bottom * lh


# --------------------------------------------------------------------------------------------------------
# Data.


def make_batch(seed, scale=3.0, b=B, c=C, k=K):
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(b, c)) * scale).astype(np.float32)
    tz = (rng.normal(size=(k, b, c)) * scale).astype(np.float32)
    y = rng.integers(0, c, size=b).astype(np.int32)
    return s, tz, y


@pytest.fixture(scope="module")
def batch():
    return make_batch(0)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    # atol: a KL that is nearly 0 (e.g. a TCKD of 1e-5 when student and teacher give the target almost the
    # same probability) has an absolute float32 floor of ~1e-7 * T^2 from rounding the logit margins, so
    # only its absolute error can be small. Every value above ~0.1 is held to rtol alone.
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


PER_EXAMPLE = {
    "kd": (lambda s, t, y: L.kd(s, t, T), lambda s, t, y: np_kd(s, t, T)),
    "tckd": (lambda s, t, y: L.tckd(s, t, y, T), lambda s, t, y: np_tckd(s, t, y, T)),
    "nckd": (lambda s, t, y: L.nckd(s, t, y, T), lambda s, t, y: np_nckd(s, t, y, T)),
    "dkd": (lambda s, t, y: L.dkd(s, t, y, ALPHA, BETA, T), lambda s, t, y: np_dkd(s, t, y, ALPHA, BETA, T)),
}


# --------------------------------------------------------------------------------------------------------
# Per-example losses.


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_per_example_losses_match_numpy(batch, name):
    s, tz, y = batch
    ours, ref = PER_EXAMPLE[name]
    for t in tz:
        out = ours(s, t, y)
        assert out.shape == (B,) and out.dtype == jnp.float32
        close(out, ref(s, t, y))


def test_cross_entropy_matches_numpy(batch):
    s, _, y = batch
    close(L.cross_entropy(s, y), np_cross_entropy(s, y))


def test_dkd_identity_per_example(batch):
    s, tz, y = batch
    for t in tz:
        p_t = np_target_prob(t, y, T)
        close(L.kd(s, t, T), L.tckd(s, t, y, T) + (1.0 - p_t) * L.nckd(s, t, y, T), atol=1e-5)
        # dkd(1, 1) is not kd: it differs by exactly p_t^teacher * NCKD.
        close(L.dkd(s, t, y, 1.0, 1.0, T) - L.kd(s, t, T), p_t * L.nckd(s, t, y, T), atol=1e-5)


@jax.jit
def _identity_terms(s, t, y, temp):
    return L.kd(s, t, temp), L.tckd(s, t, y, temp), L.nckd(s, t, y, temp), L.dkd(s, t, y, 1.0, 1.0, temp)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.05, 30.0), temp=st.floats(0.5, 8.0))
def test_dkd_identity_property(seed, scale, temp):
    s, tz, y = make_batch(seed, scale)
    t = tz[0]
    kd_, tc, nc, dkd11 = map(np.asarray, _identity_terms(s, t, y, jnp.float32(temp)))
    p_t = np_target_prob(t, y, temp)
    tol = 1e-4 * (1.0 + np.abs(kd_))
    assert np.all(np.abs(kd_ - (tc + (1.0 - p_t) * nc)) <= tol)
    assert np.all(np.abs((dkd11 - kd_) - p_t * nc) <= tol)
    assert np.all(np.stack([kd_, tc, nc]) >= -1e-5)


def test_zero_when_student_equals_teacher(batch):
    _, tz, y = batch
    t = tz[0]
    for name, (ours, _) in PER_EXAMPLE.items():
        np.testing.assert_allclose(ours(t, t, y), 0.0, atol=1e-6, err_msg=name)


def test_non_negative(batch):
    s, tz, y = batch
    for t in tz:
        for name, (ours, _) in PER_EXAMPLE.items():
            assert np.all(np.asarray(ours(s, t, y)) >= -1e-6), name


# --------------------------------------------------------------------------------------------------------
# Entropy and teacher weights.


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_entropy_matches_numpy(batch, temp):
    s, tz, _ = batch
    close(L.entropy(s, temp), np_entropy(s, temp))
    close(L.entropy(tz, temp), np_entropy(tz, temp))
    assert L.entropy(tz).shape == (K, B)
    close(L.entropy(jnp.zeros((C,))), np.log(C))


@pytest.mark.parametrize("scheme", L.WEIGHT_SCHEMES)
def test_entropy_weights_match_numpy(batch, scheme):
    _, tz, _ = batch
    for temp, tau in [(1.0, 1.0), (2.0, 0.5)]:
        w = L.entropy_weights(tz, scheme, temperature=temp, tau=tau)
        assert w.shape == (K, B) and w.dtype == jnp.float32
        close(w, np_entropy_weights(tz, scheme, temp, tau))


@pytest.mark.parametrize("scheme", L.WEIGHT_SCHEMES)
def test_entropy_weights_sums_confidence_and_permutation(batch, scheme):
    _, tz, _ = batch
    w = np.asarray(L.entropy_weights(tz, scheme))
    close(w.sum(0), np.full(B, K - 1.0 if scheme == "ebkd" else 1.0))
    assert np.all(w >= 0)

    perm = np.array([2, 0, 1])
    close(L.entropy_weights(tz[perm], scheme), w[perm])

    # Teacher 1 made confident (peaked logits), the others flattened: it gets the largest weight everywhere.
    peaked = tz * 0.5
    peaked[1] = tz[1] * 10.0
    w_peaked = np.asarray(L.entropy_weights(peaked, scheme))
    if scheme == "uniform":
        close(w_peaked, np.full((K, B), 1.0 / K))
    else:
        assert np.all(np.argmax(w_peaked, axis=0) == 1)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.05, 30.0))
def test_entropy_weights_property(seed, scale):
    _, tz, _ = make_batch(seed, scale)
    perm = np.random.default_rng(seed).permutation(K)
    for scheme in L.WEIGHT_SCHEMES:
        w = np.asarray(L.entropy_weights(tz, scheme))
        assert np.all(np.isfinite(w)) and np.all(w >= -1e-7)
        np.testing.assert_allclose(w.sum(0), K - 1.0 if scheme == "ebkd" else 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(L.entropy_weights(tz[perm], scheme)), w[perm], rtol=1e-5, atol=1e-7)


def test_ebkd_weights_when_all_teachers_are_one_hot():
    tz = np.full((K, B, C), -1e4, np.float32)
    tz[:, :, 0] = 1e4
    w = np.asarray(L.entropy_weights(tz, "ebkd"))
    np.testing.assert_allclose(w, np.full((K, B), (K - 1.0) / K))


def test_confidence_weights_match_numpy(batch):
    _, tz, y = batch
    w = L.confidence_weights(tz, y)
    assert w.shape == (K, B)
    close(w, np_confidence_weights(tz, y))
    close(np.asarray(w).sum(0), np.ones(B))


def test_camkd_feature_weights(batch):
    _, tz, y = batch
    close(L.camkd_feature_weights(tz, y), np_confidence_weights(tz, y))
    close(L.camkd_feature_weights(tz, y, stop_gradient=False), np_confidence_weights(tz, y))

    def first_weight(h, stop):
        return L.camkd_feature_weights(h, y, stop_gradient=stop)[0].sum()

    assert np.all(np.asarray(jax.grad(first_weight)(tz, True)) == 0.0)
    g = np.asarray(jax.grad(first_weight)(tz, False))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


# --------------------------------------------------------------------------------------------------------
# Multi-teacher losses.


@pytest.mark.parametrize("kind", L.LOGIT_LOSS_KINDS)
def test_multi_teacher_logit_loss_matches_numpy(batch, kind):
    s, tz, y = batch
    w = np_entropy_weights(tz, "camkd")
    out = L.multi_teacher_logit_loss(s, tz, y, w.astype(np.float32), kind=kind, alpha=ALPHA, beta=BETA,
                                     temperature=T)
    assert out.shape == () and out.dtype == jnp.float32
    close(out, np_multi_teacher(s, tz, y, w, kind, ALPHA, BETA, T))


def test_feature_mse_and_fitnet_match_numpy():
    rng = np.random.default_rng(1)
    sp = rng.normal(size=(K, B, 4, 4, 6)).astype(np.float32)
    tf = rng.normal(size=(K, B, 4, 4, 6)).astype(np.float32)
    w = rng.uniform(size=(K, B)).astype(np.float32)
    sq = (sp.astype(np.float64) - tf) ** 2
    ref = np.mean(np.sum(w * sq.mean(axis=(2, 3, 4)), axis=0))
    close(L.feature_mse(sp, tf, w), ref)
    close(L.fitnet_hint_loss(sp, tf), np.mean([sq[k].mean() for k in range(K)]))


# --------------------------------------------------------------------------------------------------------
# Numerical robustness and gradients.


def _extreme_batch():
    rng = np.random.default_rng(2)
    s = rng.choice([-1e4, 1e4], size=(B, C)).astype(np.float32)
    t = rng.choice([-1e4, 0.0, 1e4], size=(B, C)).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    # Cover target far above / far below the rest, on both sides.
    s[0], t[0] = -1e4, -1e4
    s[0, y[0]], t[1, y[1]] = 1e4, 1e4
    t[2] = 1e4
    t[2, y[2]] = -1e4
    return s, t, y


def _all_losses(s, t, y, tz, w):
    return {
        "kd": L.kd(s, t, T).sum(),
        "tckd": L.tckd(s, t, y, T).sum(),
        "nckd": L.nckd(s, t, y, T).sum(),
        "dkd": L.dkd(s, t, y, ALPHA, BETA, T).sum(),
        "ce": L.cross_entropy(s, y).sum(),
        "entropy": L.entropy(s).sum(),
        "multi_dkd": L.multi_teacher_logit_loss(s, tz, y, w),
        "multi_kd": L.multi_teacher_logit_loss(s, tz, y, w, kind="kd"),
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_extreme_and_low_precision_logits_are_finite(dtype):
    s, t, y = _extreme_batch()
    tz = np.stack([t, -t, np.zeros_like(t)])
    s, t, tz = (jnp.asarray(a, dtype) for a in (s, t, tz))
    for scheme in L.WEIGHT_SCHEMES:
        assert np.all(np.isfinite(np.asarray(L.entropy_weights(tz, scheme))))
    w = L.entropy_weights(tz, "camkd")
    assert np.all(np.isfinite(np.asarray(L.confidence_weights(tz, y))))
    for name, value in _all_losses(s, t, y, tz, w).items():
        assert np.isfinite(float(value)), name
        assert float(value) >= -1e-3, name
    for name in _all_losses(s, t, y, tz, w):
        g_s, g_t = jax.grad(lambda s_, t_: _all_losses(s_, t_, y, tz, w)[name], argnums=(0, 1))(s, t)
        assert g_s.dtype == dtype
        assert np.all(np.isfinite(np.asarray(g_s, np.float32))), name
        assert np.all(np.isfinite(np.asarray(g_t, np.float32))), name


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_inputs_computed_in_float32(batch, dtype):
    s, tz, y = batch
    s16, t16 = jnp.asarray(s, dtype), jnp.asarray(tz[0], dtype)
    s32, t32 = np.asarray(s16, np.float32), np.asarray(t16, np.float32)
    out = L.dkd(s16, t16, y, ALPHA, BETA, T)
    assert out.dtype == jnp.float32
    close(out, np_dkd(s32, t32, y, ALPHA, BETA, T))


def test_extreme_values_match_numpy_where_defined():
    # Moderately extreme logits (|z/T| up to 50) where float64 NumPy is still exact enough to compare.
    s, tz, y = make_batch(3, scale=60.0)
    t = tz[0]
    close(L.kd(s, t, T), np_kd(s, t, T), rtol=1e-4, atol=1e-3)
    close(L.tckd(s, t, y, T), np_tckd(s, t, y, T), rtol=1e-4, atol=1e-3)
    close(L.nckd(s, t, y, T), np_nckd(s, t, y, T), rtol=1e-4, atol=1e-3)


def test_no_gradient_to_teachers_or_weights(batch):
    s, tz, y = batch
    t = tz[0]
    w = np.asarray(L.entropy_weights(tz))
    per_example = {
        "kd": lambda t_: L.kd(s, t_, T),
        "tckd": lambda t_: L.tckd(s, t_, y, T),
        "nckd": lambda t_: L.nckd(s, t_, y, T),
        "dkd": lambda t_: L.dkd(s, t_, y, ALPHA, BETA, T),
    }
    for name, f in per_example.items():
        assert np.all(np.asarray(jax.grad(lambda t_: f(t_).sum())(t)) == 0.0), name
    for kind in L.LOGIT_LOSS_KINDS:
        g_t, g_w = jax.grad(lambda t_, w_: L.multi_teacher_logit_loss(s, t_, y, w_, kind=kind), argnums=(0, 1))(tz, w)
        assert np.all(np.asarray(g_t) == 0.0) and np.all(np.asarray(g_w) == 0.0), kind
        g_s = jax.grad(lambda s_: L.multi_teacher_logit_loss(s_, tz, y, w, kind=kind))(s)
        assert np.abs(np.asarray(g_s)).max() > 0
    for scheme in L.WEIGHT_SCHEMES:
        assert np.all(np.asarray(jax.grad(lambda t_: L.entropy_weights(t_, scheme)[0].sum())(tz)) == 0.0), scheme
    assert np.all(np.asarray(jax.grad(lambda t_: L.confidence_weights(t_, y)[0].sum())(tz)) == 0.0)

    rng = np.random.default_rng(4)
    sp, tf = (rng.normal(size=(K, 2, 2, 2, 3)).astype(np.float32) for _ in range(2))
    fw = rng.uniform(size=(K, 2)).astype(np.float32)
    g_tf, g_fw = jax.grad(lambda tf_, fw_: L.feature_mse(sp, tf_, fw_), argnums=(0, 1))(tf, fw)
    assert np.all(np.asarray(g_tf) == 0.0) and np.all(np.asarray(g_fw) == 0.0)
    assert np.all(np.asarray(jax.grad(lambda tf_: L.fitnet_hint_loss(sp, tf_))(tf)) == 0.0)
    assert np.abs(np.asarray(jax.grad(lambda sp_: L.feature_mse(sp_, tf, fw))(sp))).max() > 0


# --------------------------------------------------------------------------------------------------------
# API errors.


def test_shape_and_type_errors(batch):
    s, tz, y = batch
    t = tz[0]
    with pytest.raises(AssertionError):
        L.kd(s[None], t[None], T)  # rank 3
    with pytest.raises(AssertionError):
        L.kd(s, t[:, :-1], T)  # different C
    with pytest.raises(AssertionError):
        L.tckd(s, t, y[:-1], T)  # labels of the wrong length
    with pytest.raises(AssertionError):
        L.nckd(s, t, y.astype(np.float32), T)  # float labels
    with pytest.raises(AssertionError):
        L.dkd(s, t, y[:, None], ALPHA, BETA, T)  # labels of rank 2
    with pytest.raises(AssertionError):
        L.entropy_weights(t)  # no teacher axis
    with pytest.raises(AssertionError):
        L.multi_teacher_logit_loss(s, tz, y, np.ones((K, B + 1), np.float32))
    with pytest.raises(AssertionError):
        L.multi_teacher_logit_loss(s, tz[:, :-1], y, np.ones((K, B - 1), np.float32))
    with pytest.raises(AssertionError):
        L.feature_mse(np.zeros((K, B, 2, 2, 3)), np.zeros((K, B, 2, 2, 4)), np.ones((K, B)))
    with pytest.raises(AssertionError):
        L.fitnet_hint_loss(np.zeros((B, 2, 2, 3)), np.zeros((B, 2, 2, 3)))
    with pytest.raises(ValueError, match="temperature"):
        L.kd(s, t, np.ones(2))
    with pytest.raises(ValueError, match="C = 1"):
        L.tckd(s[:, :1], t[:, :1], np.zeros(B, np.int32), T)


def test_value_errors(batch):
    s, tz, y = batch
    w = np.ones((K, B), np.float32)
    with pytest.raises(ValueError, match="'entropy'.*camkd, softmax, ebkd, uniform"):
        L.entropy_weights(tz, "entropy")
    with pytest.raises(ValueError, match="'dkdd'.*dkd, kd"):
        L.multi_teacher_logit_loss(s, tz, y, w, kind="dkdd")
    for scheme in ("camkd", "ebkd"):
        with pytest.raises(ValueError, match="K = 1"):
            L.entropy_weights(tz[:1], scheme)
    for scheme in ("softmax", "uniform"):
        np.testing.assert_allclose(L.entropy_weights(tz[:1], scheme), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="K = 1"):
        L.confidence_weights(tz[:1], y)
    with pytest.raises(ValueError, match="K = 1"):
        L.camkd_feature_weights(tz[:1], y)


# --------------------------------------------------------------------------------------------------------
# Transformations.


def _step(s, tz, y, temp):
    w = L.entropy_weights(tz, "camkd")
    return L.multi_teacher_logit_loss(s, tz, y, w, temperature=temp), L.kd(s, tz[0], temp), w


def test_jit_equals_eager_with_python_or_traced_temperature(batch):
    s, tz, y = batch
    eager = _step(s, tz, y, T)
    jitted = jax.jit(_step)(s, tz, y, jnp.float32(T))
    static = jax.jit(_step, static_argnums=3)(s, tz, y, T)
    for a, b_, c in zip(eager, jitted, static):
        np.testing.assert_allclose(a, b_, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)


def test_vmap_over_seeds_equals_loop():
    seeds = range(3)
    batches = [make_batch(100 + i) for i in seeds]
    stacked = [np.stack(parts) for parts in zip(*batches)]
    temps = np.array([1.0, 2.0, 4.0], np.float32)
    vmapped = jax.vmap(_step)(*stacked, temps)
    for i, (s, tz, y) in enumerate(batches):
        looped = _step(s, tz, y, float(temps[i]))
        for a, b_ in zip(vmapped, looped):
            np.testing.assert_allclose(a[i], b_, rtol=1e-6, atol=1e-7)
    # And vmapping the whole per-example loss family over the seed axis.
    tc = jax.vmap(lambda s, tz, y: L.tckd(s, tz[0], y, T))(*stacked)
    for i, (s, tz, y) in enumerate(batches):
        close(tc[i], np_tckd(s, tz[0], y, T))


# --------------------------------------------------------------------------------------------------------
# Connectors.


def _connector_vars(rng, c_in, c_out):
    return {
        "params": {
            "conv": {"kernel": rng.normal(size=(1, 1, c_in, c_out)).astype(np.float32),
                     "bias": rng.normal(size=(c_out,)).astype(np.float32)},
            "bn": {"scale": rng.uniform(0.5, 2.0, size=(c_out,)).astype(np.float32),
                   "bias": rng.normal(size=(c_out,)).astype(np.float32)},
        },
        "batch_stats": {"bn": {"mean": rng.normal(size=(c_out,)).astype(np.float32),
                               "var": rng.uniform(0.5, 2.0, size=(c_out,)).astype(np.float32)}},
    }


def np_connector_eval(x, v):
    p, st_ = v["params"], v["batch_stats"]
    y = x @ p["conv"]["kernel"][0, 0].astype(np.float64) + p["conv"]["bias"]
    y = (y - st_["bn"]["mean"]) / np.sqrt(st_["bn"]["var"] + BN_EPSILON) * p["bn"]["scale"] + p["bn"]["bias"]
    return np.maximum(y, 0.0)


@pytest.mark.parametrize("size_in,size_out", [(8, 4), (16, 4), (4, 4), (2, 4), (3, 8)])
def test_connector_shapes_and_eval_output(size_in, size_out):
    rng = np.random.default_rng(size_in * 10 + size_out)
    x = rng.normal(size=(2, size_in, size_in, 3)).astype(np.float32)
    conn = models.Connector(out_channels=5, out_size=size_out)
    init = conn.init(jax.random.key(0), x, train=False)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(np.shape, _connector_vars(rng, 3, 5))
    v = _connector_vars(rng, 3, 5)
    out = conn.apply(v, x, train=False)
    assert out.shape == (2, size_out, size_out, 5)
    if size_in >= size_out:
        resized = np_block_mean(x.astype(np.float64), size_in // size_out)
    else:
        resized = np_bilinear_torch(x.astype(np.float64), size_out, size_out)
    close(out, np_connector_eval(resized, v), rtol=1e-5, atol=1e-5)


def test_resize_feature_map():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    close(models.resize_feature_map(x, 2), np_block_mean(x.astype(np.float64), 4))
    close(models.resize_feature_map(x, (16, 24)), np_bilinear_torch(x.astype(np.float64), 16, 24))
    with pytest.raises(ValueError, match="not a multiple"):
        models.resize_feature_map(x, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        models.Connector(4, 3).init(jax.random.key(0), x, train=False)


def test_connector_train_mode_updates_batch_stats():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    conn = models.Connector(out_channels=5, out_size=4)
    v = conn.init(jax.random.key(1), x, train=False)
    out, updates = conn.apply(v, x, train=True, mutable=["batch_stats"])
    assert out.shape == (4, 4, 4, 5)
    assert np.all(np.asarray(out) >= 0)
    y = np_block_mean(x.astype(np.float64), 2) @ np.asarray(v["params"]["conv"]["kernel"][0, 0], np.float64)
    y = y + np.asarray(v["params"]["conv"]["bias"])
    mu, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    stats = updates["batch_stats"]["bn"]
    # Flax's BatchNorm (the zoo's convention): running = momentum * running + (1 - momentum) * batch,
    # with the biased batch variance.
    close(stats["mean"], (1 - BN_MOMENTUM) * mu, rtol=1e-4, atol=1e-5)
    close(stats["var"], BN_MOMENTUM * 1.0 + (1 - BN_MOMENTUM) * var, rtol=1e-4, atol=1e-5)
    # Train mode normalises with batch statistics.
    p = v["params"]["bn"]
    ref = np.maximum((y - mu) / np.sqrt(var + BN_EPSILON) * np.asarray(p["scale"]) + np.asarray(p["bias"]), 0)
    close(out, ref, rtol=1e-4, atol=1e-4)


def test_connector_bfloat16_dtype():
    x = jnp.ones((2, 8, 8, 3), jnp.float32)
    conn = models.Connector(out_channels=4, out_size=4, dtype=jnp.bfloat16)
    v = conn.init(jax.random.key(0), x, train=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))
    assert conn.apply(v, x, train=False).dtype == jnp.bfloat16


@pytest.mark.parametrize("train", [False, True])
def test_stacked_connector_equals_separate_connectors(train):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    stacked = models.StackedConnector(num_teachers=K, out_channels=5, out_size=4)
    v = stacked.init(jax.random.key(2), x, train=False)
    assert v["params"]["connector"]["conv"]["kernel"].shape == (K, 1, 1, 3, 5)
    kernels = np.asarray(v["params"]["connector"]["conv"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1])  # independent initialisations
    # Non-trivial statistics so that eval mode is tested too.
    v = jax.tree.map(lambda a: a + rng.uniform(0.1, 1.0, size=a.shape).astype(np.float32), v)
    out, upd = stacked.apply(v, x, train=train, mutable=["batch_stats"])
    assert out.shape == (K, 2, 4, 4, 5)
    single = models.Connector(out_channels=5, out_size=4)
    for k in range(K):
        v_k = jax.tree.map(lambda a: a[k], v)
        v_k = {name: tree["connector"] for name, tree in v_k.items()}
        out_k, upd_k = single.apply(v_k, x, train=train, mutable=["batch_stats"])
        np.testing.assert_allclose(out[k], out_k, rtol=1e-5, atol=1e-5)
        jax.tree.map(lambda a, b_: np.testing.assert_allclose(a[k], b_, rtol=1e-5, atol=1e-6),
                     upd["batch_stats"]["connector"], upd_k["batch_stats"])


# --------------------------------------------------------------------------------------------------------
# Cross-checks against the PyTorch reference code of the lineage (skipped when torch is not installed).


def _mdistiller_dkd_loss(torch, logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's ``dkd_loss`` (Zhao et al.), transcribed with reduction="sum" for size_average=False."""
    F = torch.nn.functional
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = ~gt_mask
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    tckd_loss = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd_loss + beta * nckd_loss


def test_against_pytorch_reference_losses(batch):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s, tz, y = batch
    ts, ttz, ty = torch.tensor(s, dtype=torch.float64), torch.tensor(tz, dtype=torch.float64), torch.tensor(y).long()
    for k in range(K):
        ref = _mdistiller_dkd_loss(torch, ts, ttz[k], ty, ALPHA, BETA, T).item()
        close(jnp.mean(L.dkd(s, tz[k], y, ALPHA, BETA, T)), ref)
        ref_kd = F.kl_div(F.log_softmax(ts / T, 1), F.softmax(ttz[k] / T, 1), reduction="none").sum(1) * T**2
        close(L.kd(s, tz[k], T), ref_kd.numpy())
    # CA-MKD: attention = (1 - softmax(stack of per-teacher CE, dim=0)) / (K - 1).
    ce = torch.stack([F.cross_entropy(ttz[k], ty, reduction="none") for k in range(K)], dim=0)
    close(L.confidence_weights(tz, y), ((1.0 - F.softmax(ce, dim=0)) / (K - 1)).numpy())


def test_connector_against_pytorch_modules():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(8)
    for size_in, size_out in [(8, 4), (2, 4)]:
        x = rng.normal(size=(2, size_in, size_in, 3)).astype(np.float32)
        v = _connector_vars(rng, 3, 5)
        xt = torch.tensor(x).permute(0, 3, 1, 2).double()
        if size_in > size_out:
            xt = F.adaptive_avg_pool2d(xt, (size_out, size_out))
        else:
            xt = F.interpolate(xt, size=(size_out, size_out), mode="bilinear", align_corners=False)
        conv = torch.nn.Conv2d(3, 5, 1).double()
        bn = torch.nn.BatchNorm2d(5, momentum=1 - BN_MOMENTUM, eps=BN_EPSILON).double().eval()
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(v["params"]["conv"]["kernel"][0, 0].T[:, :, None, None]))
            conv.bias.copy_(torch.tensor(v["params"]["conv"]["bias"]))
            bn.weight.copy_(torch.tensor(v["params"]["bn"]["scale"]))
            bn.bias.copy_(torch.tensor(v["params"]["bn"]["bias"]))
            bn.running_mean.copy_(torch.tensor(v["batch_stats"]["bn"]["mean"]))
            bn.running_var.copy_(torch.tensor(v["batch_stats"]["bn"]["var"]))
            ref = F.relu(bn(conv(xt))).permute(0, 2, 3, 1).numpy()
        out = models.Connector(out_channels=5, out_size=size_out).apply(v, x, train=False)
        close(out, ref, rtol=1e-5, atol=1e-5)


def _random_variables(model, rng, image_size):
    """Variables of the right structure without running the (slow to compile) initializers."""
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_size=image_size))

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return np.ones(leaf.shape, np.float32)
        return (rng.normal(size=leaf.shape) * 0.3).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_feature_pipeline_with_zoo_models():
    """The DE-MKD / CA-MKD feature path end to end: student map -> K connectors -> losses and head weights."""
    rng = np.random.default_rng(9)
    teacher = create_model("resnet8", num_classes=C, width=0.25)
    student = create_model("vgg8", num_classes=C, width=0.125)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    y = jnp.array([1, 7], jnp.int32)
    t_vars = jax.tree.map(lambda *a: np.stack(a), *[_random_variables(teacher, rng, 16) for _ in range(K)])
    s_vars = _random_variables(student, rng, 16)

    @jax.jit
    def run(t_vars, s_vars, key):
        t_logits, t_feats = jax.vmap(lambda v: teacher.apply(v, x, train=False))(t_vars)
        _, s_feats = student.apply(s_vars, x, train=False)
        f_t = t_feats[-2]  # [K, B, 4, 4, C_t]; the student's map is 2x2: bilinear upsampling
        conn = models.StackedConnector(num_teachers=K, out_channels=f_t.shape[-1], out_size=f_t.shape[2])
        c_vars = conn.init(key, s_feats[-2], train=False)
        projected, _ = conn.apply(c_vars, s_feats[-2], train=True, mutable=["batch_stats"])
        head_logits = jax.vmap(lambda v, f: teacher.apply(v, f, method="head"))(t_vars, projected)
        w = L.entropy_weights(t_logits)
        return projected, f_t, head_logits, w, L.camkd_feature_weights(head_logits, y), L.feature_mse(projected, f_t, w)

    projected, f_t, head_logits, w, w_feat, loss = map(np.asarray, run(t_vars, s_vars, jax.random.key(0)))
    assert projected.shape == f_t.shape and f_t.shape[:2] == (K, 2)
    close(w_feat, np_confidence_weights(head_logits, np.asarray(y)))
    sq = (projected.astype(np.float64) - f_t) ** 2
    close(loss, np.mean(np.sum(w * sq.mean(axis=(2, 3, 4)), axis=0)))


# --------------------------------------------------------------------------------------------------------
# Bad inputs to dkd (issue 17): refused with a clear error, at no cost in a compiled step.

_Z = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
_Y = np.array([0, 1, 4, 2], np.int32)


@pytest.mark.parametrize("student, teacher, labels, temperature, error, message", [
    (_Z.astype(np.int32), _Z, _Y, 4.0, TypeError, "logits must be floating point, got dtype int32"),
    (_Z, (_Z * 10).astype(np.int64), _Y, 4.0, TypeError, "logits must be floating point, got dtype int"),
    (_Z, _Z, np.array([0, 1, 5, 2], np.int32), 4.0, ValueError, "labels span [0, 5], expected them in [0, 4]"),
    (_Z, _Z, np.array([0, -1, 4, 2], np.int32), 4.0, ValueError, "labels span [-1, 4]"),
    (_Z, _Z, _Y, 0.0, ValueError, "temperature must be > 0, got 0.0"),
    (_Z, _Z, _Y, -2.0, ValueError, "temperature must be > 0, got -2.0"),
    (_Z, _Z, _Y, float("nan"), ValueError, "temperature must be > 0, got nan"),
], ids=["int_student_logits", "int_teacher_logits", "label_too_large", "negative_label", "zero_temperature",
        "negative_temperature", "nan_temperature"])
def test_dkd_refuses_bad_inputs(student, teacher, labels, temperature, error, message):
    with pytest.raises(error) as err:
        L.dkd(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels), 1.0, 8.0, temperature)
    assert message in str(err.value)


def test_dkd_value_checks_add_nothing_to_the_compiled_step():
    """Traced labels and temperature are not checked (the trainer validates them once): the jaxpr is the same
    whether the values are checkable or not."""
    traced = jax.make_jaxpr(lambda s, t, y: L.dkd(s, t, y, 1.0, 8.0, 4.0))(_Z, _Z, _Y)
    closed = jax.make_jaxpr(lambda s, t: L.dkd(s, t, jnp.asarray(_Y), 1.0, 8.0, 4.0))(_Z, _Z)
    assert len(traced.jaxpr.eqns) == len(closed.jaxpr.eqns)
    bad = jax.jit(lambda y: L.dkd(_Z, _Z, y, 1.0, 8.0, 4.0))(jnp.asarray([0, 1, 9, 2]))  # no error under jit
    assert bad.shape == (4,)

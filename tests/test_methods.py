"""The method table and each method's loss terms against direct transcriptions of the reference code.

The transcriptions below follow the reference implementations line by line (CA-MKD's helper/loops.py,
distiller_zoo/KD.py and CAMKD.py; mdistiller's distillers/KD.py and DKD.py), written with plain softmax / log /
sums as those files do, not with demkd_jax.losses. Values and gradients with respect to the student are compared.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demkd_jax import config as config_lib
from demkd_jax import methods

T, ALPHA, BETA, C, B = 4.0, 1.0, 8.0, 7, 6


# ---------------------------------------------------------------------------------------------------------
# Reference transcriptions


def _kl_div(log_input, target):
    """torch.nn.KLDivLoss(reduction='none'): target * (log target - input), 0 where target == 0."""
    safe = jnp.where(target > 0, target, 1.0)
    return jnp.where(target > 0, target * (jnp.log(safe) - log_input), 0.0)


def ref_distill_kl(y_s, y_t, is_ca=False):
    """CA-MKD DistillKL: per-example KL * T^2 (is_ca) or batchmean KL * T^2."""
    p_s = jax.nn.log_softmax(y_s / T, axis=1)
    p_t = jax.nn.softmax(y_t / T, axis=1)
    per = (_kl_div(p_s, p_t) * T**2).sum(-1)
    return per if is_ca else per.sum() / y_s.shape[0]


def ref_aver(s, tz, y):
    return jnp.stack([ref_distill_kl(s, t) for t in tz]).mean(0)


def ref_ebkd(s, tz, y):
    loss_div = jnp.stack([ref_distill_kl(s, t, is_ca=True) for t in tz])
    entropy = jnp.stack([(-(jax.nn.softmax(t, 1)) * jnp.log(jax.nn.softmax(t, 1))).sum(1) for t in tz])
    weight = 1.0 - entropy / entropy.sum(0)
    return (weight * loss_div).sum() / (1.0 * s.shape[0] * len(tz))


def ref_ce_none(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, 1), y[:, None], 1)[:, 0]


def ref_camkd(s, tz, y):
    loss_t = jnp.stack([ref_ce_none(t, y) for t in tz])
    attention = (1.0 - jax.nn.softmax(loss_t, axis=0)) / (len(tz) - 1)
    loss_div = jnp.stack([ref_distill_kl(s, t, is_ca=True) for t in tz])
    return (attention * loss_div).sum() / (1.0 * s.shape[0] * len(tz))


def ref_mdistiller_kd(s, tz, y):
    log_pred_student = jax.nn.log_softmax(s / T, axis=1)
    pred_teacher = jax.nn.softmax(tz[0] / T, axis=1)
    loss_kd = _kl_div(log_pred_student, pred_teacher).sum(1).mean() * T**2
    return 0.9 * loss_kd


def ref_mdistiller_dkd_single(s, t, y, alpha=ALPHA, beta=BETA):
    gt_mask = jax.nn.one_hot(y, s.shape[1])
    other_mask = 1.0 - gt_mask
    pred_student = jax.nn.softmax(s / T, axis=1)
    pred_teacher = jax.nn.softmax(t / T, axis=1)
    cat = lambda p: jnp.stack([(p * gt_mask).sum(1), (p * other_mask).sum(1)], axis=1)
    pred_student, pred_teacher = cat(pred_student), cat(pred_teacher)
    tckd = _kl_div(jnp.log(pred_student), pred_teacher).sum() * T**2 / y.shape[0]
    pred_teacher_part2 = jax.nn.softmax(t / T - 1000.0 * gt_mask, axis=1)
    log_pred_student_part2 = jax.nn.log_softmax(s / T - 1000.0 * gt_mask, axis=1)
    nckd = _kl_div(log_pred_student_part2, pred_teacher_part2).sum() * T**2 / y.shape[0]
    return alpha * tckd + beta * nckd


def ref_mdistiller_dkd(s, tz, y):
    return ref_mdistiller_dkd_single(s, tz[0], y)


def _dkd_per_example(s, t, y):
    return jnp.stack([ref_mdistiller_dkd_single(s[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(s.shape[0])])


def ref_demkd(reduction):
    def loss(s, tz, y):
        h = jnp.stack([-(jax.nn.softmax(t, 1) * jax.nn.log_softmax(t, 1)).sum(1) for t in tz])
        w = (1.0 - jax.nn.softmax(h, axis=0)) / (len(tz) - 1)
        per = jnp.stack([_dkd_per_example(s, t, y) for t in tz])
        total = (w * per).sum(0)
        return (total / len(tz) if reduction == "mean" else total).mean()
    return loss


def ref_dkd_uniform(s, tz, y):
    return jnp.stack([ref_mdistiller_dkd_single(s, t, y) for t in tz]).mean(0)


REFERENCES = {
    "kd": ref_mdistiller_kd,
    "dkd": ref_mdistiller_dkd,
    "aver": ref_aver,
    "ebkd": ref_ebkd,
    "camkd": ref_camkd,
    "fitnet_mkd": ref_aver,  # CA-MKD's FitNet-MKD run adds the AVER KD term (-a 1) to the hints
    "dkd_uniform": ref_dkd_uniform,
    "demkd": ref_demkd("sum"),
}


def _inputs(k, seed=0):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(rng.normal(0, 2, (B, C)), jnp.float32)
    tz = jnp.asarray(rng.normal(0, 3, (k, B, C)), jnp.float32)
    y = jnp.asarray(rng.integers(0, C, B), jnp.int32)
    return s, tz, y


def _config(**distill):
    c = config_lib.base_config()
    c.distill.update(temperature=T, alpha=ALPHA, beta=BETA, **distill)
    return c


# ---------------------------------------------------------------------------------------------------------
# The table


def test_every_method_has_a_reference_and_a_consistent_row():
    assert set(methods.METHOD_NAMES) == set(REFERENCES) | {"ce"}
    for m in methods.METHODS.values():
        assert m.reference
        assert (m.logit_loss is None) == (m.teachers == "none") == (m.weighting is None)
        assert m.reduction in ("sum", "mean", "config") and m.feature_term in ("none", "feature", "camkd", "hint")
    with pytest.raises(ValueError, match="unknown method 'nope'.*expected one of"):
        methods.get("nope")


def test_resolve_applies_overrides_and_method_defaults():
    c = _config()
    c.distill.method = "kd"
    r = methods.resolve(c)
    assert (r.ce_weight, r.kd_weight, r.warmup_epochs, r.nesterov) == (0.1, 0.9, 0, False)
    c.distill.update(method="demkd", features=False)
    r = methods.resolve(c)
    assert (r.ce_weight, r.warmup_epochs, r.reduction, r.feature_term, r.nesterov) == (1.0, 20, "sum", "none", True)
    c.distill.update(ce_weight=0.5, kd_weight=2.0, warmup_epochs=3, teacher_reduction="mean", features=True)
    c.optim.nesterov = False
    r = methods.resolve(c)
    assert (r.ce_weight, r.kd_weight, r.warmup_epochs, r.reduction, r.feature_term, r.nesterov) == (
        0.5, 2.0, 3, "mean", "feature", False)
    c.distill.method = "ebkd"  # a baseline keeps its reference's reduction whatever teacher_reduction says
    assert methods.resolve(c).reduction == "mean"


# ---------------------------------------------------------------------------------------------------------
# Logit terms against the references: values and student gradients


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_logit_term_equals_reference(method, k):
    if methods.get(method).teachers == "one" and k != 2:
        pytest.skip("single-teacher method: one K is enough")
    s, tz, y = _inputs(k, seed=k)
    config = _config(method=method)
    ours = lambda s_: methods.logit_term(method, s_, tz, y, config)
    ref = lambda s_: REFERENCES[method](s_, tz, y)
    value = ours(s)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    np.testing.assert_allclose(value, ref(s), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(s), jax.grad(ref)(s), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_demkd_mean_reduction_is_the_sum_over_k(k):
    s, tz, y = _inputs(k, seed=10 + k)
    ref = ref_demkd("mean")
    ours = lambda s_: methods.logit_term("demkd", s_, tz, y, _config(teacher_reduction="mean"))
    np.testing.assert_allclose(ours(s), ref(s, tz, y), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(s), jax.grad(lambda s_: ref(s_, tz, y))(s), rtol=1e-4, atol=1e-6)
    total = methods.logit_term("demkd", s, tz, y, _config(teacher_reduction="sum"))
    np.testing.assert_allclose(ours(s) * k, total, rtol=1e-5)


def test_logit_term_of_a_method_without_teachers_is_an_error():
    s, tz, y = _inputs(2)
    with pytest.raises(ValueError, match="method 'ce' has no logit term"):
        methods.logit_term("ce", s, tz, y, _config())


# ---------------------------------------------------------------------------------------------------------
# Feature terms


def _feature_inputs(k, seed=0):
    rng = np.random.default_rng(seed)
    projected = jnp.asarray(rng.normal(size=(k, B, 2, 2, 5)), jnp.float32)
    t_feats = jnp.asarray(rng.normal(size=(k, B, 2, 2, 5)), jnp.float32)
    heads = jnp.asarray(rng.normal(size=(k, 5, C)), jnp.float32)
    y = jnp.asarray(rng.integers(0, C, B), jnp.int32)
    return projected, t_feats, heads, y


def _head(heads, projected):
    """Each teacher's classifier (pool + linear) on its projected student feature, as CA-MKD's distill_seq()[-1]."""
    return jnp.einsum("kbc,kcn->kbn", projected.mean(axis=(2, 3)), heads)


def ref_camkd_features(projected, t_feats, head_logits, y):
    """CA-MKD's CAMKD.forward: weights from the heads' CE (not detached), MSE per example, / (B K)."""
    k = projected.shape[0]
    loss_t = jnp.stack([ref_ce_none(h, y) for h in head_logits])
    weight = (1.0 - jax.nn.softmax(loss_t, axis=0)) / (k - 1)
    loss_st = jnp.stack([jnp.square(p - f).reshape(B, -1).mean(-1) for p, f in zip(projected, t_feats)])
    return (weight * loss_st).sum() / (1.0 * B * k)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_camkd_feature_term_equals_reference_gradient_through_the_weights(k):
    projected, t_feats, heads, y = _feature_inputs(k, seed=k)
    c = _config(method="camkd")
    r = methods.resolve(c)
    assert r.feature_term == "camkd" and not c.distill.camkd_detach_feature_weights
    ours = lambda p: methods.feature_term(r, p, t_feats, None, _head(heads, p), y, c.distill)
    ref = lambda p: ref_camkd_features(p, t_feats, _head(heads, p), y)
    np.testing.assert_allclose(ours(projected), ref(projected), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(jax.grad(ours)(projected), jax.grad(ref)(projected), rtol=1e-4, atol=1e-7)
    # Detached weights: the same value, and the gradient of the MSE alone.
    c_detached = _config(method="camkd", camkd_detach_feature_weights=True)
    detached = lambda p: methods.feature_term(r, p, t_feats, None, _head(heads, p), y, c_detached.distill)
    ref_detached = lambda p: ref_camkd_features(p, t_feats, jax.lax.stop_gradient(_head(heads, p)), y)
    np.testing.assert_allclose(detached(projected), ours(projected), rtol=1e-6)
    g = jax.grad(detached)(projected)
    np.testing.assert_allclose(g, jax.grad(ref_detached)(projected), rtol=1e-4, atol=1e-7)
    assert np.abs(np.asarray(g - jax.grad(ours)(projected))).max() > 1e-6


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_demkd_feature_term_reuses_the_logit_weights(reduction):
    k = 3
    projected, t_feats, _, y = _feature_inputs(k, seed=4)
    w = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).normal(size=(k, B)), jnp.float32), axis=0)
    c = _config(method="demkd", teacher_reduction=reduction)
    got = methods.feature_term(methods.resolve(c), projected, t_feats, w, None, y, c.distill)
    per = np.square(np.asarray(projected - t_feats)).mean(axis=(2, 3, 4))
    want = (np.asarray(w) * per).sum(0).mean() / (k if reduction == "mean" else 1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_fitnet_hint_is_the_mean_over_teachers():
    k = 3
    projected, t_feats, _, y = _feature_inputs(k, seed=5)
    c = _config(method="fitnet_mkd")
    r = methods.resolve(c)
    assert r.feature_term == "hint" and r.feature_weight == c.distill.hint_weight
    got = methods.feature_term(r, projected, t_feats, None, None, y, c.distill)
    want = np.mean([np.square(np.asarray(projected[i] - t_feats[i])).mean() for i in range(k)])
    np.testing.assert_allclose(got, want, rtol=1e-5)

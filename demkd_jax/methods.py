"""The distillation methods in one table, and each method's loss terms as pure functions.

How a run's loss is assembled from a method's row: docs/method.md §2 ("In the code").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from demkd_jax import losses


@dataclasses.dataclass(frozen=True)
class Method:
    """One distillation method: what its loss is made of and which reference defines it."""

    name: str
    logit_loss: str | None  # per-teacher logit loss: "kd", "dkd", or None (no teacher in the loss)
    weighting: str | None  # "single" (teacher 0 only), "uniform", "ebkd", "confidence" (labels), "entropy"
    reduction: str  # over teachers: "sum", "mean", or "config" (config.distill.teacher_reduction)
    feature_term: str  # "none", "feature" (weighted MSE at features[-2]), "camkd", "hint" (FitNet)
    ce_weight: float
    kd_weight: float
    warmup_epochs: int  # linear warm-up of the logit term
    teachers: str  # "none", "one", "many"
    nesterov: bool  # the reference's optimizer (SGD momentum 0.9, with or without Nesterov)

    @property
    def reference(self) -> str:
        return _REFERENCES[self.name]


METHODS: dict[str, Method] = {m.name: m for m in (
    #      name           logit  weighting     reduction feature    CE   KD   warm-up teachers nesterov
    Method("ce",          None,  None,         "sum",    "none",    1.0, 0.0, 0,      "none",  True),
    Method("kd",          "kd",  "single",     "sum",    "none",    0.1, 0.9, 0,      "one",   False),
    Method("dkd",         "dkd", "single",     "sum",    "none",    1.0, 1.0, 20,     "one",   False),
    Method("aver",        "kd",  "uniform",    "sum",    "none",    1.0, 1.0, 0,      "many",  True),
    Method("ebkd",        "kd",  "ebkd",       "mean",   "none",    1.0, 1.0, 0,      "many",  True),
    Method("camkd",       "kd",  "confidence", "mean",   "camkd",   1.0, 1.0, 0,      "many",  True),
    Method("fitnet_mkd",  "kd",  "uniform",    "sum",    "hint",    1.0, 1.0, 0,      "many",  True),
    Method("dkd_uniform", "dkd", "uniform",    "config", "none",    1.0, 1.0, 20,     "many",  True),
    Method("demkd",       "dkd", "entropy",    "config", "feature", 1.0, 1.0, 20,     "many",  True),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

_CAMKD_CODE = "CA-MKD code (Zhang et al., ICASSP 2022: helper/loops.py, distiller_zoo/)"
_MDISTILLER = "mdistiller (Zhao et al., CVPR 2022)"
_REFERENCES = {
    "ce": "cross-entropy training, as the CA-MKD/CRD teachers",
    "kd": f"Hinton et al. 2015 as in {_MDISTILLER}: distillers/KD.py",
    "dkd": f"{_MDISTILLER}: distillers/DKD.py",
    "aver": f"{_CAMKD_CODE}, AVERAGE_LOSS",
    "ebkd": f"Kwon et al., ICASSP 2020, as in {_CAMKD_CODE}, EBKD",
    "camkd": f"{_CAMKD_CODE}, CAMKD + inter",
    "fitnet_mkd": f"{_CAMKD_CODE}, AVERAGE_LOSS + hint",
    "dkd_uniform": "ablation of DE-MKD: its DKD term with equal teacher weights, no feature term",
    "demkd": "Cheng et al., Mathematics 2024 (DKD term as mdistiller, feature term as CA-MKD)",
}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (config.distill.method); expected one of "
                         f"{', '.join(METHOD_NAMES)}")
    return METHODS[name]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A method's row with ``config.distill``'s overrides applied: the numbers a run uses."""

    method: Method
    ce_weight: float
    kd_weight: float
    warmup_epochs: int
    reduction: str
    feature_term: str  # "none" when config.distill.features switches an optional feature term off
    feature_weight: float  # λ: distill.hint_weight for FitNet's hint, distill.feature_weight otherwise
    nesterov: bool


def resolve(config) -> Resolved:
    """The method of ``config`` with its overrides (``None``/``-1`` in the config: the method's default)."""
    distill = config.distill
    method = get(distill.method)
    # config.distill.features switches the feature term of DE-MKD and CA-MKD; FitNet's hint is the method.
    optional = method.feature_term in ("feature", "camkd")
    feature = "none" if optional and not distill.features else method.feature_term
    return Resolved(
        method=method,
        ce_weight=float(method.ce_weight if distill.ce_weight is None else distill.ce_weight),
        kd_weight=float(method.kd_weight if distill.kd_weight is None else distill.kd_weight),
        warmup_epochs=int(method.warmup_epochs if distill.warmup_epochs < 0 else distill.warmup_epochs),
        reduction=str(distill.teacher_reduction if method.reduction == "config" else method.reduction),
        feature_term=feature,
        feature_weight=float(distill.hint_weight if feature == "hint" else distill.feature_weight),
        nesterov=bool(method.nesterov if config.optim.nesterov is None else config.optim.nesterov),
    )


def teacher_weights(method: str, teacher_logits: jax.Array, labels: jax.Array, distill) -> jax.Array:
    """Per-example teacher weights ``[K, B]`` of ``method`` (constants for the gradient)."""
    m = get(method)
    if m.weighting == "single":
        return jnp.zeros(teacher_logits.shape[:2], jnp.float32).at[0].set(1.0)
    if m.weighting in ("uniform", "ebkd"):
        return losses.entropy_weights(teacher_logits, scheme=m.weighting)
    if m.weighting == "confidence":
        return losses.confidence_weights(teacher_logits, labels)
    if m.weighting == "entropy":
        return losses.entropy_weights(teacher_logits, scheme=distill.weights, temperature=distill.weight_temperature,
                                      tau=distill.weight_tau)
    raise ValueError(f"method {method!r} has no teacher weights")


def weighted_logit_term(r: Resolved, student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                        weights: jax.Array, distill) -> jax.Array:
    """:func:`logit_term` of a resolved method with its teacher ``weights [K, B]`` already computed."""
    m = r.method
    if m.weighting == "single":
        teacher_logits, weights = teacher_logits[:1], weights[:1]
    return r.kd_weight * losses.multi_teacher_logit_loss(
        student_logits, teacher_logits, labels, weights, kind=m.logit_loss, alpha=distill.alpha, beta=distill.beta,
        temperature=distill.temperature, reduction=r.reduction)


def logit_term(method: str, student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
               config) -> jax.Array:
    """The term on logits that ``method`` adds to its CE term, with its KD weight and teacher reduction, before the
    warm-up factor. Scalar; ``teacher_logits [K, B, C]`` (single-teacher methods use teacher 0)."""
    c = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    c.distill.method = method
    r = resolve(c)
    if r.method.logit_loss is None:
        raise ValueError(f"method {method!r} has no logit term")
    weights = teacher_weights(method, teacher_logits, labels, c.distill)
    return weighted_logit_term(r, student_logits, teacher_logits, labels, weights, c.distill)


def feature_term(r: Resolved, projected: jax.Array, teacher_features: jax.Array, weights: jax.Array,
                 head_logits: jax.Array | None, labels: jax.Array, distill) -> jax.Array:
    """The feature term (before λ and its ramp) of a resolved method. Scalar.

    ``projected [K, B, H, W, C]``: the student map through each teacher's connector; ``teacher_features``
    alike; ``weights [K, B]``: the logit term's teacher weights (DE-MKD reuses them); ``head_logits [K, B, C]``:
    each teacher's classifier applied to ``projected`` (CA-MKD only, else None).
    """
    kind = r.feature_term
    if kind == "hint":
        return losses.fitnet_hint_loss(projected, teacher_features)
    if kind == "feature":
        return losses.feature_mse(projected, teacher_features, weights, reduction=r.reduction)
    if kind == "camkd":
        detach = bool(distill.camkd_detach_feature_weights)
        feat_weights = losses.camkd_feature_weights(head_logits, labels, stop_gradient=detach)
        return losses.feature_mse(projected, teacher_features, feat_weights, reduction=r.reduction,
                                  detach_weights=detach)
    raise ValueError(f"method {r.method.name!r} has no feature term")

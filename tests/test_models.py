"""Model zoo: exact parameter counts, feature layout, BN semantics, dtypes, BN folding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demkd_jax.models import (
    MODEL_NAMES,
    PARAM_COUNTS,
    count_params,
    create_model,
    feature_shapes,
    fold_batchnorm,
    init_variables,
    winograd,
)

REFERENCE_FEATURES = {  # docs/method.md §5 (NHWC, batch dropped)
    "vgg8": [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)],
    "vgg13": [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)],
    "wrn_40_2": [(32, 32, 16), (32, 32, 32), (16, 16, 64), (8, 8, 128), (128,)],
    "ShuffleV2": [(32, 32, 24), (16, 16, 116), (8, 8, 232), (4, 4, 1024), (1024,)],
    "resnet32x4": [(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256), (256,)],
}
REAL_FORWARD = ["vgg8", "wrn_16_2", "ShuffleV2", "MobileNetV2"]


def abstract_outputs(name, num_classes=100, batch=2):
    model = create_model(name, num_classes)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((batch, 32, 32, 3)), train=False), variables)
    return variables, out


def test_registry_has_exactly_the_21_reference_names():
    assert set(MODEL_NAMES) == set(PARAM_COUNTS)
    assert len(MODEL_NAMES) == 21


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model name 'resnet18'.*vgg8.*MobileNetV2"):
        create_model("resnet18")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_count_and_feature_layout(name):
    variables, (logits, feats) = abstract_outputs(name)
    assert count_params(variables["params"]) == PARAM_COUNTS[name]
    chex.assert_shape(logits, (2, 100))
    chex.assert_type(logits, jnp.float32)
    assert feats[-1].ndim == 2 and feats[-1].shape[0] == 2, "features[-1] is the pooled vector"
    assert feats[-2].ndim == 4, "features[-2] is the last feature map before pooling"
    for f in feats[:-1]:
        chex.assert_rank(f, 4)
    if name in REFERENCE_FEATURES:
        assert [f.shape[1:] for f in feats] == REFERENCE_FEATURES[name]


@pytest.mark.parametrize("name", sorted(REFERENCE_FEATURES))
def test_feature_shapes_follow_the_image_size(name):
    model = create_model(name)
    assert [f.shape[1:] for f in feature_shapes(model)] == REFERENCE_FEATURES[name]
    halved = [(h // 2, w // 2, c) for h, w, c in REFERENCE_FEATURES[name][:-1]] + REFERENCE_FEATURES[name][-1:]
    small = feature_shapes(model, (16, 16, 3))
    assert [f.shape[1:] for f in small] == halved
    chex.assert_equal(small[0].shape[0], 2)


def test_num_classes_sets_the_classifier():
    _, (logits, _) = abstract_outputs("resnet8", num_classes=10)
    chex.assert_shape(logits, (2, 10))


@pytest.fixture(scope="module", params=REAL_FORWARD)
def real_model(request):
    """A real forward on a small batch, with non-trivial BN statistics."""
    name = request.param
    model = create_model(name)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))

    @jax.jit
    def make_variables(rng):
        variables = init_variables(model, rng)
        # One train-mode pass (updates BN statistics), so eval-mode and folding tests are non-trivial.
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return {"params": variables["params"], "batch_stats": updates["batch_stats"]}

    return name, model, make_variables(jax.random.PRNGKey(1)), x


def test_real_forward_shapes_and_finite(real_model):
    name, model, variables, x = real_model
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_shape(logits, (4, 100))
    chex.assert_tree_all_finite((logits, feats))
    expected = [f.shape for f in abstract_outputs(name, batch=4)[1][1]]
    assert [f.shape for f in feats] == expected


def test_batchnorm_train_updates_stats_eval_is_pure(real_model):
    _, model, variables, x = real_model
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    _, updates = train_apply(variables, x * 2.0 + 1.0)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                                     updates["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed)), "train mode must update every BN's statistics"
    # Eval mode: nothing mutable is returned changed, and two calls agree bit for bit.
    out1, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))(variables, x)
    out2 = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_trees_all_equal(state["batch_stats"], variables["batch_stats"])
    chex.assert_trees_all_equal(out1, out2)


def test_head_maps_last_feature_map_to_logits(real_model):
    _, model, variables, x = real_model
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    head_logits = jax.jit(lambda v, f: model.apply(v, f, method="head"))(variables, feats[-2])
    np.testing.assert_allclose(head_logits, logits, rtol=1e-5, atol=1e-5)


def test_bn_folding_matches_eval_mode(real_model):
    name, model, variables, x = real_model
    folded_model = create_model(name, fold_bn=True)
    folded = fold_batchnorm(variables)
    abstract = jax.eval_shape(lambda: init_variables(folded_model, jax.random.PRNGKey(0)))
    chex.assert_trees_all_equal_shapes(folded, abstract)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    f_logits, f_feats = jax.jit(lambda v, x: folded_model.apply(v, x, train=False))(folded, x)
    np.testing.assert_allclose(f_logits, logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(f_feats, feats):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params():
    model = create_model("resnet8", dtype=jnp.bfloat16)
    variables = jax.jit(lambda r: init_variables(model, r))(jax.random.PRNGKey(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    (logits, feats), _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    chex.assert_type(logits, jnp.float32)
    chex.assert_type(feats[-2], jnp.bfloat16)
    chex.assert_tree_all_finite((logits, feats))


def test_width_multiplier_shrinks_channels():
    model = create_model("vgg8", width=0.125)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
    _, feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3)), train=False), variables)
    assert feats[-2].shape == (1, 4, 4, 64)
    assert count_params(variables["params"]) < PARAM_COUNTS["vgg8"] / 50


@pytest.mark.parametrize("shape", [(2, 4, 4, 8, 16), (1, 5, 7, 3, 4), (3, 8, 8, 16, 8)])
def test_winograd_conv3x3_matches_direct_convolution_and_its_gradient(shape):
    n, h, w, cin, cout = shape
    kx, kk = jax.random.split(jax.random.PRNGKey(sum(shape)))
    x = jax.random.normal(kx, (n, h, w, cin))
    kernel = jax.random.normal(kk, (3, 3, cin, cout)) / 3

    def direct(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST)

    def wino(x, k):
        return winograd.conv3x3(x, k, precision=jax.lax.Precision.HIGHEST)

    out = jax.jit(wino)(x, kernel)
    chex.assert_shape(out, (n, h, w, cout))
    np.testing.assert_allclose(out, direct(x, kernel), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
    gx, gk = jax.jit(jax.grad(loss(wino), argnums=(0, 1)))(x, kernel)
    rx, rk = jax.grad(loss(direct), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gk, rk, rtol=1e-4, atol=1e-4)


def test_winograd_model_has_the_same_parameters_and_outputs():
    # vgg8 at width 0.5: the convolutions of the two 4x4 stages (128 -> 256 and 256 -> 256 channels) are the
    # Winograd layers; the 32x32 and 16x16 maps and the 8x8 stage (64 input channels) stay direct.
    direct = create_model("vgg8", num_classes=10, width=0.5, fold_bn=True)
    wino = create_model("vgg8", num_classes=10, width=0.5, fold_bn=True, winograd=True)
    variables = jax.jit(lambda r: init_variables(direct, r))(jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_shapes(variables, jax.eval_shape(lambda: init_variables(wino, jax.random.PRNGKey(0))))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    convs = lambda m: str(jax.make_jaxpr(lambda v, x: m.apply(v, x, train=False))(variables, x)).count("conv_general")
    assert convs(wino) == convs(direct) - 2
    logits, feats = jax.jit(lambda v, x: direct.apply(v, x, train=False))(variables, x)
    w_logits, w_feats = jax.jit(lambda v, x: wino.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(w_logits, logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(w_feats, feats):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

"""PyTorch checkpoint import: exactness against the reference PyTorch zoo, layouts, errors, round trip."""

import argparse
import sys

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from demkd_jax import checkpoint, convert  # noqa: E402
from demkd_jax.models import MODEL_NAMES, PARAM_COUNTS, count_params, create_model, init_variables  # noqa: E402
from conftest import load_benchmark  # noqa: E402

torch_models = load_benchmark("torch_models")  # noqa: E402
create_torch_model = torch_models.create_torch_model

torch.set_num_threads(1)

TOL = 1e-4  # max abs difference, logits and every feature map
# Forward parity for every zoo model: Flax compile dominates (~20 s for all 21 on one CPU core).
FORWARD = MODEL_NAMES


def randomized_torch_model(name, seed=0, num_classes=100):
    """A reference model in eval mode with random weights, random BN affine and random BN statistics.

    The statistics are first set from a train-mode pass on a random batch (momentum 1, so activations stay of
    order one through depth and the comparison is meaningful at 1e-4), then perturbed randomly: variances
    scaled by U(0.5, 2), means shifted by N(0, 0.2) standard deviations. In the CIFAR ResNets the last BN of
    each residual branch gets its scale divided by sqrt(blocks per stage) (as depth-scaled initialisations do),
    so that the residual stream stays of order one in resnet110 too instead of growing with depth.
    """
    torch.manual_seed(seed)
    model = create_torch_model(name, num_classes)
    gen = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(0.0, 0.2, generator=gen)
            bn.momentum = 1.0
        for stage in (getattr(model, f"layer{i}", None) for i in (1, 2, 3)):
            for block in stage if isinstance(stage, torch.nn.Sequential) else ():
                if isinstance(block, torch_models.BasicBlock):
                    block.bn2.weight.div_(len(stage) ** 0.5)
        model.train()
        model(torch.randn(8, 3, 32, 32, generator=gen))
        for bn in bns:
            std = bn.running_var.sqrt()
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=gen) * 0.2 * std)
            bn.running_var.mul_(torch.empty(bn.running_var.shape).uniform_(0.5, 2.0, generator=gen))
            bn.momentum = 0.1
    return model.eval()


def torch_forward(model, x_nhwc):
    with torch.no_grad():
        feats, logits = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), is_feat=True)
    nhwc = [f.numpy().transpose(0, 2, 3, 1) if f.ndim == 4 else f.numpy() for f in feats]
    return logits.numpy(), nhwc


def flax_forward(name, variables, x_nhwc, num_classes=100):
    model = create_model(name, num_classes)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_nhwc)
    return np.asarray(logits), [np.asarray(f) for f in feats]


def max_diffs(name, variables, torch_model, x):
    t_logits, t_feats = torch_forward(torch_model, x)
    f_logits, f_feats = flax_forward(name, variables, x)
    assert [f.shape for f in f_feats] == [f.shape for f in t_feats], "feature layout differs"
    logit_diff = float(np.abs(f_logits - t_logits).max())
    feat_diffs = [float(np.abs(a - b).max()) for a, b in zip(f_feats, t_feats)]
    return logit_diff, feat_diffs, float(np.abs(t_logits).max())


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet8():
    model = randomized_torch_model("resnet8", seed=3)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", FORWARD)
def test_logits_and_every_feature_match_torch(name, images):
    torch_model = randomized_torch_model(name)
    variables = convert.from_torch_state_dict(torch_model.state_dict(), name)
    logit_diff, feat_diffs, logit_scale = max_diffs(name, variables, torch_model, images)
    print(f"{name}: max|dlogits| {logit_diff:.2e} (|logits| <= {logit_scale:.2f}), "
          f"max|dfeature| {max(feat_diffs):.2e} per feature {['%.1e' % d for d in feat_diffs]}")
    assert logit_scale > 0.1, "degenerate test: logits near zero"
    assert logit_diff <= TOL
    assert max(feat_diffs) <= TOL, feat_diffs


@pytest.mark.parametrize("name", ["resnet110", "ShuffleV1"])
def test_float64_differences_are_rounding_only(name, images):
    """The same weights (float32 values) run in float64 on both sides give every feature map to 1e-10: the
    float32 differences above are rounding, not a layout or semantics difference (deepest model; grouped
    convolutions, channel shuffles and the pooled shortcut)."""
    torch_model = randomized_torch_model(name)
    variables = convert.from_torch_state_dict(torch_model.state_dict(), name)
    torch_model = torch_model.double()
    with torch.no_grad():
        t_feats, t_logits = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float64)), is_feat=True)
    with jax.enable_x64(True):
        model = create_model(name, dtype=np.float64)
        v64 = jax.tree_util.tree_map(lambda a: a.astype(np.float64), variables)
        logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(v64, images.astype(np.float64))
        assert all(f.dtype == np.float64 for f in feats)
        logits, feats = np.asarray(logits), [np.asarray(f) for f in feats]
    # The zoo returns float32 logits (computed in float64 here, then rounded).
    np.testing.assert_allclose(logits, t_logits.numpy(), rtol=1e-6, atol=1e-7)
    for f, t in zip(feats, t_feats):
        t = t.numpy()
        np.testing.assert_allclose(f, t.transpose(0, 2, 3, 1) if t.ndim == 4 else t, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_zoo_model_converts_with_reference_param_count(name):
    torch_model = create_torch_model(name)
    assert sum(p.numel() for p in torch_model.parameters()) == PARAM_COUNTS[name]
    sd = torch_model.state_dict()
    assert convert.expected_torch_shapes(name) == {
        k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")
    }
    variables = convert.from_torch_state_dict(sd, name)
    model = create_model(name)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
    checkpoint.compare_trees(abstract, variables, name)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(variables))
    assert count_params(variables["params"]) == PARAM_COUNTS[name]
    # Spot-check the layout transforms on the first conv (OIHW -> HWIO) and the classifier ([out, in] -> [in, out]).
    first_conv = next(m for m in torch_model.modules() if isinstance(m, torch.nn.Conv2d))
    kernels = [x for x in jax.tree_util.tree_leaves(variables["params"]) if x.ndim == 4]
    assert any(k.shape == tuple(first_conv.weight.permute(2, 3, 1, 0).shape)
               and np.array_equal(k, first_conv.weight.detach().numpy().transpose(2, 3, 1, 0)) for k in kernels)


def test_grouped_and_depthwise_kernels_are_transposed_per_group():
    torch_model = create_torch_model("ShuffleV1")
    variables = convert.from_torch_state_dict(torch_model.state_dict(), "ShuffleV1")
    block = torch_model.layer2[1]
    params = variables["params"]["layers_1_1"]
    assert block.conv1.groups == 3 and block.conv2.groups == block.conv2.out_channels
    np.testing.assert_array_equal(params["conv_bn1"]["conv"]["kernel"],
                                  block.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["conv_bn2"]["conv"]["kernel"],
                                  block.conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert params["conv_bn1"]["conv"]["kernel"].shape == (1, 1, 160, 120)  # [kh, kw, I/g, O]


# -------------------------------------------------------------------------------------------- layouts
def test_checkpoint_layouts_all_convert_alike(resnet8):
    _, sd = resnet8
    reference = convert.from_torch_state_dict(sd, "resnet8")
    np_sd = {k: v.numpy() for k, v in sd.items()}
    layouts = {
        "model": {"model": sd, "epoch": 240, "best_acc": 70.0},
        "state_dict": {"state_dict": sd},
        "net": {"net": sd, "acc": 70.0},
        "DataParallel": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "numpy": np_sd,
        "half": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
    }
    for what, obj in layouts.items():
        variables = convert.from_torch_state_dict(obj, "resnet8")
        if what == "half":
            chex.assert_trees_all_close(variables, reference, atol=1e-2, rtol=1e-2)
        else:
            chex.assert_trees_all_equal(variables, reference, custom_message=what)


def test_num_classes_is_inferred_and_checked():
    sd = create_torch_model("wrn_16_1", num_classes=10).state_dict()
    variables = convert.from_torch_state_dict(sd, "wrn_16_1")
    assert variables["params"]["fc"]["kernel"].shape == (64, 10)
    convert.from_torch_state_dict(sd, "wrn_16_1", num_classes=10)
    with pytest.raises(convert.ConversionError, match=r"'fc.weight' has 10 classes.*100 classes were asked"):
        convert.from_torch_state_dict(sd, "wrn_16_1", num_classes=100)


# --------------------------------------------------------------------------------------------- errors
def test_missing_key_is_named(resnet8):
    _, sd = resnet8
    sd = dict(sd)
    del sd["layer1.0.bn1.running_var"]
    with pytest.raises(convert.ConversionError, match=r"missing 1 keys: layer1\.0\.bn1\.running_var") as e:
        convert.from_torch_state_dict(sd, "resnet8")
    assert "look" not in str(e.value), "no model hint when the requested model is still the best fit"


def test_unexpected_key_is_named(resnet8):
    _, sd = resnet8
    sd = {**sd, "proj.weight": torch.zeros(3, 3), "bn1.num_batches_tracked": torch.tensor(5)}
    with pytest.raises(convert.ConversionError, match=r"unexpected 1 keys: proj\.weight$"):
        convert.from_torch_state_dict(sd, "resnet8")
    sd = {**sd, "fc.num_batches_tracked": torch.tensor(5)}  # only BatchNorms' counters are ignored
    with pytest.raises(convert.ConversionError, match=r"fc\.num_batches_tracked"):
        convert.from_torch_state_dict(sd, "resnet8")


def test_wrong_shape_names_key_and_both_shapes(resnet8):
    _, sd = resnet8
    sd = {**sd, "layer2.0.conv2.weight": torch.zeros(32, 16, 3, 3)}
    with pytest.raises(convert.ConversionError,
                       match=r"wrong shapes: layer2\.0\.conv2\.weight: expected \(32, 32, 3, 3\), found \(32, 16, 3, 3\)"):
        convert.from_torch_state_dict(sd, "resnet8")


def test_wrong_model_names_the_model_the_keys_look_like(resnet8):
    _, sd = resnet8
    with pytest.raises(convert.ConversionError,
                       match=r"look like a 'resnet8' checkpoint \(100 classes\), not 'resnet8x4'"):
        convert.from_torch_state_dict(sd, "resnet8x4")
    sd10 = create_torch_model("wrn_40_2", num_classes=10).state_dict()
    with pytest.raises(convert.ConversionError,
                       match=r"look like a 'wrn_40_2' checkpoint \(10 classes\), not 'vgg13'.*missing \d+ keys"):
        convert.from_torch_state_dict({"model": sd10}, "vgg13")
    assert convert.guess_model({k: tuple(v.shape) for k, v in sd10.items()}) == ("wrn_40_2", 10, 1.0)


def test_unknown_model_and_not_a_state_dict():
    with pytest.raises(convert.ConversionError, match=r"unknown model name 'resnet18'.*MobileNetV2"):
        convert.from_torch_state_dict({}, "resnet18")
    with pytest.raises(convert.ConversionError, match=r"found no state dict.*'optimizer'"):
        convert.from_torch_state_dict({"optimizer": {}, "epoch": 3}, "resnet8")


def test_missing_torch_names_the_extra(monkeypatch, tmp_path, capsys):
    assert not hasattr(convert, "torch"), "convert must import torch lazily"
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]"'):
        convert.load_torch_file(tmp_path / "x.pth")
    assert convert.main(["--torch", str(tmp_path / "x.pth"), "--model", "vgg8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "demkd-jax[torch]"' in err


# ----------------------------------------------------------------------------------------- round trip
def test_cli_round_trip_through_teacher_checkpoint(resnet8, images, tmp_path, capsys):
    torch_model, sd = resnet8
    pth = tmp_path / "ckpt_epoch_240.pth"
    # RepDistiller's final checkpoint also pickles its argparse options: needs weights_only=False.
    torch.save({"opt": argparse.Namespace(model="resnet8"), "model": sd, "best_acc": torch.tensor(69.06),
                "epoch": 240}, pth)
    out = tmp_path / "teacher"
    assert convert.main(["--torch", str(pth), "--model", "resnet8", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "weights_only=False" in captured.err and "argparse.Namespace" in captured.err
    assert captured.out.count("\n") == 1 and "resnet8, 100 classes, 83,892 parameters" in captured.out
    assert "best_acc 69.06" in captured.out and "sanity forward ok" in captured.out

    variables, meta = checkpoint.load_teacher(out, model_name="resnet8", num_classes=100)
    assert meta["source"] == "torch" and meta["torch_file"] == str(pth.absolute())
    assert meta["best_acc"] == pytest.approx(69.06) and meta["epoch"] == 240
    assert meta["num_params"] == PARAM_COUNTS["resnet8"]
    logit_diff, feat_diffs, _ = max_diffs("resnet8", variables, torch_model, images)
    assert logit_diff <= TOL and max(feat_diffs) <= TOL
    with pytest.raises(checkpoint.CheckpointError, match=r"holds a 'resnet8', but the config expects 'resnet20'"):
        checkpoint.load_teacher(out, model_name="resnet20", num_classes=100)

    # --weights-only refuses the pickle; a plain {"state_dict": ...} file loads safely without a note.
    assert convert.main(["--torch", str(pth), "--model", "resnet8", "--out", str(tmp_path / "t2"),
                         "--weights-only"]) == 2
    assert "cannot be loaded with weights_only=True (it pickles argparse.Namespace)" in capsys.readouterr().err
    safe = tmp_path / "safe.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, safe)
    assert convert.main(["--torch", str(safe), "--model", "resnet8", "--out", str(tmp_path / "t3"),
                         "--no-check"]) == 0
    assert capsys.readouterr().err == ""
    chex.assert_trees_all_equal(checkpoint.load_teacher(tmp_path / "t3")[0], variables)


def test_distillation_runs_on_converted_teachers(make_config, tmp_path):
    """convert -> teacher checkpoints -> a DE-MKD config that names them: the trainer loads them through the
    same restore path as its own teachers, reports the accuracies the PyTorch models have on the same test
    images, and never changes them while distilling."""
    from demkd_jax import data as data_lib
    from demkd_jax import train

    torch_models_ = [randomized_torch_model("resnet8", seed=10 + k, num_classes=10) for k in range(3)]
    dirs = []
    for k, tm in enumerate(torch_models_):
        pth = tmp_path / f"t{k}.pth"
        torch.save({"model": tm.state_dict()}, pth)
        out = tmp_path / f"teacher_{k}"
        assert convert.main(["--torch", str(pth), "--model", "resnet8", "--out", str(out), "--num-classes", "10",
                             "--no-check"]) == 0
        dirs.append(str(out))
    before = [checkpoint.load_teacher(d)[0] for d in dirs]

    config = make_config(**{"distill.method": "demkd", "distill.features": True, "distill.warmup_epochs": 1,
                            "distill.feature_start_epoch": 1, "teachers.checkpoints": tuple(dirs),
                            "teachers.model": "resnet8", "num_epochs": 1})
    summary = train.train_and_evaluate(config, str(tmp_path / "student"))

    ds = data_lib.load_dataset(config.data)
    x = ((ds.test_images / 255.0 - ds.mean) / ds.std).astype(np.float32)
    probs = []
    expected = []
    for tm in torch_models_:
        logits, _ = torch_forward(tm, x)
        expected.append(round(100.0 * float(np.mean(logits.argmax(-1) == ds.test_labels)), 2))
        probs.append(torch.softmax(torch.from_numpy(logits), -1).numpy())
    ensemble = round(100.0 * float(np.mean(np.mean(probs, 0).argmax(-1) == ds.test_labels)), 2)
    assert summary["teachers"]["test_acc"] == expected
    assert summary["teachers"]["ensemble_test_acc"] == ensemble
    assert np.isfinite(summary["final_test_acc"]).all()
    for d, v in zip(dirs, before):
        chex.assert_trees_all_equal(checkpoint.load_teacher(d)[0], v)


def test_cli_errors_are_one_line_exit_2(resnet8, tmp_path, capsys):
    _, sd = resnet8
    pth = tmp_path / "resnet8.pth"
    torch.save({"model": sd}, pth)
    assert convert.main(["--torch", str(pth), "--model", "vgg8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "look like a 'resnet8' checkpoint (100 classes), not 'vgg8'" in err
    assert not (tmp_path / "o").exists()
    assert convert.main(["--torch", str(tmp_path / "nope.pth"), "--model", "vgg8", "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert convert.main(["--torch", str(tmp_path / "garbage.pth"), "--model", "vgg8", "--out", str(tmp_path / "o"),
                         "--weights-only"]) == 2
    assert "cannot be loaded" in capsys.readouterr().err

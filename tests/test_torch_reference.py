"""The PyTorch reference benchmark (benchmarks/torch_reference.py): it runs, and it computes what demkd_jax does."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from demkd_jax import losses  # noqa: E402
from conftest import REPO_ROOT, load_benchmark, repo_env  # noqa: E402

SCRIPT = REPO_ROOT / "benchmarks" / "torch_reference.py"


tr = load_benchmark("torch_reference")

REQUIRED_KEYS = {"name", "batch", "dtype", "features", "img_per_s", "ms_per_step", "device", "threads",
                 "torch_version", "num_workers", "data"}


def test_every_mode_runs_and_prints_one_json_line():
    env = repo_env()
    # One thread: this is a correctness check, and a 2-thread OpenMP team crawls on a loaded 2-core box.
    cmd = [sys.executable, str(SCRIPT), "--mode", "all", "--batch", "8", "--steps", "2", "--warmup", "0",
           "--data", "synthetic", "--synthetic-size", "24", "--threads", "1", "--no-isolate", "--no-probe"]
    out = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in records] == list(tr.MODES)
    assert "torch" in out.stderr and "threads 1" in out.stderr  # the header: device, threads, torch version
    for r in records:
        assert REQUIRED_KEYS <= r.keys(), REQUIRED_KEYS - r.keys()
        assert r["batch"] == 8 and r["dtype"] == "float32" and r["data"] == "synthetic"
        assert r["threads"] == 1 and r["num_workers"] == 0 and r["device"] == "cpu"
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["features"] == (r["mode"] in ("demkd", "camkd_features"))
        assert r["ratio_to_peer"] == pytest.approx(r["img_per_s"] / tr.PEER_IMG_PER_S[r["mode"]], rel=1e-2)
        if r["mode"] != "teacher_forward":
            assert np.isfinite(r["loss"]) and r["loss"] > 0


def test_isolated_modes_get_the_same_arguments():
    argv = ["--mode", "all", "--batch", "8", "--isolate", "--steps=2"]
    assert tr._mode_argv(argv, "demkd") == ["--batch", "8", "--steps=2", "--mode", "demkd", "--no-isolate"]
    assert tr._mode_argv(["--mode=all"], "student_ce") == ["--mode", "student_ce", "--no-isolate"]


def test_augmentation_matches_the_torchvision_pipeline_on_pil_and_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(4)
    mean, std = np.asarray(tr.CIFAR100_MEAN), np.asarray(tr.CIFAR100_STD)
    for augment in ("pil", "numpy"):
        ds = tr.CIFARLike(images, labels, tr.train_transform(), augment=augment)
        torch.manual_seed(3)
        x, y = ds[1]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
        # Undo the normalisation: every pixel is a source pixel or a zero from the 4-pixel padding.
        pix = np.rint((x.numpy() * std[:, None, None] + mean[:, None, None]) * 255).astype(np.int64)
        padded = np.pad(images[1], ((4, 4), (4, 4), (0, 0))).transpose(2, 0, 1).astype(np.int64)
        found = [(i, j, f) for i in range(9) for j in range(9) for f in (False, True)
                 if np.array_equal(pix, (padded[:, i:i + 32, j:j + 32][:, :, ::-1] if f
                                         else padded[:, i:i + 32, j:j + 32]))]
        assert found, augment
    # Same torch seed -> the same crop and flip on both paths.
    outs = []
    for augment in ("pil", "numpy"):
        torch.manual_seed(7)
        outs.append(tr.CIFARLike(images, labels, tr.train_transform(), augment=augment)[2][0])
    torch.testing.assert_close(outs[0], outs[1])


def _random_case(seed=0, k=3, b=16, c=100, scale=3.0):
    rng = np.random.default_rng(seed)
    z_s = (scale * rng.standard_normal((b, c))).astype(np.float32)
    z_t = (scale * rng.standard_normal((k, b, c))).astype(np.float32)
    y = rng.integers(0, c, size=(b,)).astype(np.int32)
    return z_s, z_t, y


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_dkd_kd_and_weights_match_demkd_jax_losses(scale):
    z_s, z_t, y = _random_case(scale=scale)
    ts, tt, ty = torch.from_numpy(z_s), [torch.from_numpy(z) for z in z_t], torch.from_numpy(y).long()
    alpha, beta, temp = 1.0, 6.0, 4.0
    tol = dict(rtol=1e-4, atol=1e-5)
    for k in range(len(tt)):
        np.testing.assert_allclose(tr.dkd_loss(ts, tt[k], ty, alpha, beta, temp).numpy(),
                                   np.asarray(losses.dkd(z_s, z_t[k], y, alpha, beta, temp)), **tol)
        np.testing.assert_allclose(tr.kd_loss(ts, tt[k], temp).numpy(), np.asarray(losses.kd(z_s, z_t[k], temp)),
                                   **tol)
    w_t = tr.entropy_weights(tt)
    w_j = losses.entropy_weights(jnp.asarray(z_t), scheme="camkd", temperature=1.0)
    np.testing.assert_allclose(w_t.numpy(), np.asarray(w_j), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_t.sum(0).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(tr.confidence_weights(tt, ty).numpy(),
                               np.asarray(losses.confidence_weights(jnp.asarray(z_t), y)), rtol=1e-5, atol=1e-6)
    total_t = tr.weighted_dkd_loss(ts, tt, ty, w_t, alpha, beta, temp).item()
    total_j = float(losses.multi_teacher_logit_loss(z_s, jnp.asarray(z_t), y, w_j, kind="dkd", alpha=alpha,
                                                    beta=beta, temperature=temp))
    assert total_t == pytest.approx(total_j, rel=1e-5)


def test_feature_term_matches_demkd_jax_losses():
    rng = np.random.default_rng(1)
    k, b = 3, 4
    proj = rng.standard_normal((k, b, 512, 4, 4)).astype(np.float32)  # NCHW, as the torch models
    feat = rng.standard_normal((k, b, 512, 4, 4)).astype(np.float32)
    w = rng.dirichlet(np.ones(k), size=b).T.astype(np.float32)  # [K, B]
    got = tr.weighted_feature_mse([torch.from_numpy(p) for p in proj], [torch.from_numpy(f) for f in feat],
                                  torch.from_numpy(w)).item()
    nhwc = (0, 1, 3, 4, 2)
    want = float(losses.feature_mse(proj.transpose(nhwc), feat.transpose(nhwc), w))
    assert got == pytest.approx(want, rel=1e-5)


def test_connectors_pool_a_larger_student_map_and_project_to_the_teacher():
    conn = tr.Connectors(64, [(2, 128, 4, 4), (2, 256, 8, 8)])
    out = conn(torch.randn(2, 64, 8, 8))
    assert [tuple(o.shape) for o in out] == [(2, 128, 4, 4), (2, 256, 8, 8)]
    assert all(bool((o >= 0).all()) for o in out)  # ReLU at the end
    assert isinstance(conn.embed0.transfer[0], torch.nn.Conv2d) and conn.embed0.transfer[0].bias is not None

"""Benchmarks at CI size: they run, print one JSON line per variant, and show asynchronous dispatch."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]
KEYS = {"name", "batch", "dtype", "features", "teachers_execution", "img_per_s", "ms_per_step", "device"}


def test_step_speed_tiny():
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_speed.py"), "--config", str(REPO / "configs" / "vgg8.py"),
           "--batch", "8", "--dtype", "float32", "--width", "0.125", "--steps", "2", "--warmup", "1",
           "--dataset-size", "64", "--variants", "demkd_loop", "demkd_logits_vmap", "teacher_forward", "student_ce"]
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in records] == ["demkd", "demkd_logits", "teacher_forward", "student_ce"]
    for r in records:
        assert KEYS <= set(r), r
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["batch"] == 8
    assert records[0]["features"] is True and records[1]["features"] is False
    assert records[1]["teachers_execution"] == "vmap"
    assert "device:" in out.stderr and "jax" in out.stderr


def test_steps_are_dispatched_asynchronously():
    """The host enqueues several steps in a fraction of the time they take to run (no hidden sync)."""

    @jax.jit
    def step(x):
        for _ in range(4):
            x = jnp.tanh(x @ x.T @ x) / x.shape[0]
        return x

    x = jnp.ones((768, 768)) / 768
    jax.block_until_ready(step(x))
    with jax.transfer_guard("disallow"):
        t0 = time.perf_counter()
        for _ in range(6):
            x = step(x)
        dispatched = time.perf_counter() - t0
        jax.block_until_ready(x)
        total = time.perf_counter() - t0
    if total < 0.05:
        pytest.skip(f"steps too fast on this machine to tell dispatch from execution ({total * 1e3:.1f} ms)")
    assert dispatched < 0.5 * total, f"dispatch {dispatched * 1e3:.1f} ms vs total {total * 1e3:.1f} ms"


def test_step_speed_seed_sweep_and_overrides():
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_speed.py"), "--config", str(REPO / "configs" / "vgg8.py"),
           "--student", "resnet8", "--teacher", "resnet8", "--batch", "8", "--dtype", "float32", "--width", "0.25",
           "--steps", "2", "--warmup", "1", "--dataset-size", "64", "--variants", "student_ce", "--seeds", "1", "2",
           "--winograd", "on", "--image-size", "16"]
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["config"], r["num_seeds"], r["image_size"]) for r in records] == [("resnet8", 1, 16), ("resnet8", 2, 16)]
    assert all(r["winograd"] == {"student": True, "teachers": True} for r in records)


def test_gpu_session_stops_a_phase_at_its_time_limit(tmp_path):
    gs = load_benchmark("gpu_session")
    script = "import sys, time; print('{\"a\": 1}', flush=True); print('to the log', file=sys.stderr, flush=True); " \
             "time.sleep(60)"
    t0 = time.monotonic()
    result = gs.run_logged([sys.executable, "-c", script], tmp_path / "log", 3, tmp_path / "out.jsonl")
    assert time.monotonic() - t0 < 30
    assert result["timed_out"] and result["rc"] is None
    assert gs.read_jsonl(tmp_path / "out.jsonl") == [{"a": 1}]
    assert "to the log" in (tmp_path / "log").read_text()
    ok = gs.run_logged([sys.executable, "-c", "print('{\"b\": 2}')"], tmp_path / "log", 60, tmp_path / "out.jsonl")
    assert ok == {**ok, "rc": 0, "timed_out": False}
    assert gs.read_jsonl(tmp_path / "out.jsonl") == [{"a": 1}, {"b": 2}]


def test_gpu_session_summary_ratio_and_projection():
    gs = load_benchmark("gpu_session")
    step = [{"name": "demkd", "features": True, "batch": 64, "dtype": "float32", "num_seeds": 1, "img_per_s": 900.0,
             "ms_per_step": 71.1, "teachers_execution": "loop", "device": "H100", "jax_version": "x"},
            {"name": "demkd", "features": True, "batch": 64, "dtype": "float32", "num_seeds": 1, "img_per_s": 1200.0,
             "ms_per_step": 53.3, "teachers_execution": "vmap", "device": "H100", "jax_version": "x"},
            {"name": "demkd", "features": False, "batch": 64, "dtype": "float32", "img_per_s": 5000.0},
            {"name": "demkd", "features": True, "batch": 1024, "dtype": "bfloat16", "num_seeds": 1,
             "img_per_s": 20000.0, "ms_per_step": 51.2, "teachers_execution": "vmap"},
            {"name": "teacher_forward", "batch": 64, "dtype": "float32", "img_per_s": 9000.0}]
    torch_rows = [{"mode": "demkd", "img_per_s": 200.0, "ms_per_step": 320.0},
                  {"mode": "demkd_logits", "img_per_s": 250.0}]
    student = [{"epoch": 1, "epoch_time_s": 40.0, "test_acc": 10.0, "best_test_acc": 10.0, "img_per_s": 1250},
               {"epoch": 2, "epoch_time_s": 10.0, "test_acc": 20.0, "best_test_acc": 20.0, "img_per_s": 5000},
               {"epoch": 3, "epoch_time_s": 12.0, "test_acc": 19.0, "best_test_acc": 20.0, "img_per_s": 4166}]
    s = gs.summarize(step, torch_rows, student, [{"epoch": 1, "epoch_time_s": 30.0, "test_acc": 5.0}])
    assert s["jax_demkd_b64_f32"]["img_per_s"] == 1200.0 and s["jax_demkd_b64_f32"]["teachers_execution"] == "vmap"
    assert s["ratio_jax_to_torch"] == 6.0
    assert s["jax_best_any_batch"]["batch"] == 1024
    st = s["recipe_student"]
    assert st["epochs_done"] == 3 and st["epoch_time_s_median"] == 11.0  # the compiling first epoch left out
    assert st["projected_total_min"] == 44.0 and st["best_test_acc"] == 20.0
    assert s["recipe_teachers"]["epochs_done"] == 1
    assert gs.summarize(step, torch_rows, [], [], width=0.125)["ratio_jax_to_torch"] is None  # other models
    empty = gs.summarize([], [], [], [])
    assert empty["ratio_jax_to_torch"] is None and empty["recipe_student"] is None


def test_conv_layers_tiny():
    cmd = [sys.executable, str(REPO / "benchmarks" / "conv_layers.py"), "--batch", "2", "--repeats", "1",
           "--layers", "8x16x16", "4x128x8"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["hw"], r["cin"], r["cout"]) for r in records] == [(8, 16, 16), (4, 128, 8)]
    assert [r["winograd_default"] for r in records] == [False, True]
    for r in records:
        assert {"xla_direct", "xla_winograd"} <= set(r["ms"]) and all(v > 0 for v in r["gflops"].values())


def test_teacher_weight_stats_on_known_logits():
    """Teacher 0 is confident and right, teacher 1 unsure and wrong on half the examples: the weights must favour
    teacher 0, the most-weighted teacher is always right where they disagree, a random one half the time."""
    tw = load_benchmark("teacher_weights")
    n, c = 8, 5
    labels = np.arange(n) % c
    sure = np.full((n, c), -4.0)
    sure[np.arange(n), labels] = 4.0
    unsure = np.zeros((n, c))
    unsure[np.arange(n), np.where(np.arange(n) % 2 == 0, labels, (labels + 1) % c)] = 0.5
    stats = tw.weight_stats(np.stack([sure, unsure]).astype(np.float32), labels, "camkd")
    assert stats["teacher_top1"] == [100.0, 50.0]
    assert stats["disagree_percent"] == 50.0
    assert stats["top_weighted_right_when_disagree"] == 100.0
    assert stats["random_teacher_right_when_disagree"] == 50.0
    assert stats["weight_mean"][0] > 0.5 > stats["weight_mean"][1]
    assert abs(sum(stats["weight_mean"]) - 1.0) < 1e-3
    assert stats["weight_std_over_examples"] == [0.0, 0.0]
    assert stats["ensemble_top1_uniform"] == stats["ensemble_top1_weighted"] == 100.0


def test_teacher_weights_on_saved_teachers(tmp_path, capsys):
    from conftest import TINY_CLASSES, write_tiny_npz

    from demkd_jax import checkpoint, models

    root = write_tiny_npz(tmp_path / "npz", n_train=24, n_test=12, size=16)
    model = models.create_model("resnet8", TINY_CLASSES, width=0.25)
    dirs = []
    for k in range(2):
        variables = models.init_variables(model, jax.random.key(k), image_size=16)
        dirs.append(str(checkpoint.save_teacher(tmp_path / f"t{k}", variables, model_name="resnet8",
                                                num_classes=TINY_CLASSES, width=0.25)))
    tw = load_benchmark("teacher_weights")
    assert tw.main(["--teachers", *dirs, "--train-examples", "10", "--batch", "8", "--data", "source=npz",
                    f"path={root}", "name=tiny", f"num_classes={TINY_CLASSES}", "image_size=16",
                    f"cache_dir={tmp_path / 'cache'}"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["split"], r["examples"]) for r in records] == [("test", 12), ("train[:10]", 10)]
    for r in records:
        assert len(r["teacher_top1"]) == len(r["weight_mean"]) == 2
        assert abs(sum(r["weight_mean"]) - 1.0) < 1e-3
        assert 0.0 <= r["weight_spread"]["mean"] <= r["weight_spread"]["max"] <= 1.0
        assert 0.0 <= r["ensemble_top1_weighted"] <= 100.0
    assert tw.main(["--teachers", str(tmp_path / "missing"), "--data", "source=npz", f"path={root}", "name=tiny",
                    f"num_classes={TINY_CLASSES}", "image_size=16", f"cache_dir={tmp_path / 'cache'}"]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tw.main(["--teachers", *dirs, "--data", "downsample=two"])
    assert exit_info.value.code == 2
    assert "downsample must be int, got str" in capsys.readouterr().err

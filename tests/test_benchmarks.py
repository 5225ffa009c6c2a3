"""Benchmarks at CI size: they run, print one JSON line per variant, and show asynchronous dispatch."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

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
           "--winograd", "on"]
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["config"], r["num_seeds"]) for r in records] == [("resnet8", 1), ("resnet8", 2)]
    assert all(r["winograd"] == {"student": True, "teachers": True} for r in records)


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

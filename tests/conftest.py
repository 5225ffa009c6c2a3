"""Shared test configuration.

XLA compile time dominates a CPU test run; tests measure correctness, not speed, so most XLA
optimisations are switched off (set DEMKD_TEST_OPTIMIZE=1 to keep them).
"""

import os
import pathlib

import jax
import pytest

if os.environ.get("DEMKD_TEST_OPTIMIZE", "0") != "1":
    jax.config.update("jax_disable_most_optimizations", True)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("DEMKD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package), once per session."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def repo_env(base: dict | None = None, **extra: str) -> dict:
    """Environment for a subprocess that must import this checkout's demkd_jax, pip-installed or not.

    ``base`` (default ``os.environ``) with the repository prepended to PYTHONPATH, then ``extra``.
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (real CIFAR); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data directory {SHARED_DATA} is absent (set DEMKD_SHARED_DATA to point at it)")
    return SHARED_DATA


# ----------------------------------------------------------------------------------------------------------
# A tiny training setup shared by the trainer-level tests.

TINY_CLASSES = 10

# The smallest real run: resnet8 at width 0.25 on 96 training images, batch 16 (6 steps per epoch).
TINY_OVERRIDES = {
    "data.source": "npz",
    "data.name": "tiny",
    "data.num_classes": TINY_CLASSES,
    "student.model": "resnet8",
    "student.width": 0.25,
    "num_epochs": 2,
    "batch_size": 16,
    "eval_batch_size": 8,
    "optim.learning_rate": 0.05,
    "progress_bar": False,
    "log_every_steps": 4,
    "distill.method": "ce",
    "distill.warmup_epochs": 20,
}


def write_tiny_npz(root: pathlib.Path, *, n_train: int = 96, n_test: int = 37, seed: int = 0,
                   label_shift: int = 0, size: int = 32) -> pathlib.Path:
    """A tiny npz dataset (``tiny_train.npz``/``tiny_test.npz``) of class-coloured, learnable images.

    ``size`` x ``size`` pixels; ``label_shift`` adds to every training label (labels out of range for a
    bad-input test).
    """
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (TINY_CLASSES, 3))
    for name, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % TINY_CLASSES
        images = rng.integers(0, 64, (n, size, size, 3)) + palette[labels][:, None, None, :] // 2
        if name == "train":
            labels = labels + label_shift
        np.savez(root / f"tiny_{name}.npz", image=np.clip(images, 0, 255).astype(np.uint8),
                 label=labels.astype(np.int64))
    return root


def apply_overrides(config, overrides: dict):
    """Sets ``{"a.b": value}`` entries on a ConfigDict."""
    for key, value in overrides.items():
        target = config
        *path, leaf = key.split(".")
        for p in path:
            target = target[p]
        target[leaf] = value
    return config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> pathlib.Path:
    return write_tiny_npz(tmp_path_factory.mktemp("tiny_npz"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tiny_cache")


@pytest.fixture
def make_config(tiny_data, tiny_cache):
    """``make_config(**{"a.b": value})``: the tiny config (method 'ce') with overrides."""
    from demkd_jax import config as config_lib

    def make(**overrides):
        c = config_lib.base_config()
        apply_overrides(c, {**TINY_OVERRIDES, "data.path": str(tiny_data), "data.cache_dir": str(tiny_cache)})
        return apply_overrides(c, overrides)

    return make

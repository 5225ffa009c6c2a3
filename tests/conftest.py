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


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (real CIFAR); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data directory {SHARED_DATA} is absent (set DEMKD_SHARED_DATA to point at it)")
    return SHARED_DATA

"""The notebooks in notebooks/: executed at a tiny size on CPU, and committed without outputs.

Each notebook's cell tagged ``parameters`` (papermill's convention) gets the test's values appended, as
papermill would inject them; nbclient then runs every cell in a fresh ``python3`` kernel (this interpreter) in
a temporary working directory. A cell that raises fails the test with the cell's traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest
from conftest import repo_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TIMEOUT_S = 600  # per cell
MAX_CELL_CHARS = 5000
MAX_NOTEBOOK_BYTES = 40_000


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell is tagged 'parameters'"
    return cells[0]


def execute(name: str, parameters: dict, workdir: pathlib.Path, cpu_devices: int = 1):
    """Runs notebooks/<name> with ``parameters`` overriding its parameters cell; returns (notebook, seconds).

    ``cpu_devices``: how many CPU devices the kernel's JAX sees (XLA's host-platform device count).
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = parameters_cell(nb)
    injected = "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    cell.source += "\n# Injected by tests/test_notebooks.py:\n" + injected
    env = repo_env(JAX_PLATFORMS="cpu", MPLBACKEND="module://matplotlib_inline.backend_inline",
                   PYDEVD_DISABLE_FILE_VALIDATION="1",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cpu_devices}")
    if os.environ.get("DEMKD_TEST_OPTIMIZE", "0") != "1":  # as tests/conftest.py: compile time dominates
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    t0 = time.time()
    client.execute(env=env)
    return nb, time.time() - t0


def outputs_text(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                text.append(out["data"]["text/plain"])
    return "".join(text)


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """quickstart.ipynb on the demo pipeline at a tiny size: 2 resnet8 teachers and the student, 1 epoch each."""
    workdir = tmp_path_factory.mktemp("quickstart")
    params = {"WORKDIR": str(workdir / "run"), "TEACHER_EPOCHS": 1, "STUDENT_EPOCHS": 1,
              "OVERRIDES": {"teachers.num": 2, "teachers.model": "resnet8", "teachers.width": 0.25,
                            "student.width": 0.25, "data.cache_dir": str(workdir / "cache")}}
    nb, seconds = execute("quickstart.ipynb", params, workdir)
    print(f"\nquickstart.ipynb ran in {seconds:.1f} s")
    return nb, workdir, seconds


def test_quickstart_runs_the_demo_and_plots(quickstart):
    nb, workdir, _ = quickstart
    text = outputs_text(nb)
    assert "student's final test accuracy" in text and "restored step" in text
    assert "these 12 correct" in text
    assert images(nb) == 3  # training curves, entropy weights, predicted test images
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    assert summary["method"] == "demkd" and len(summary["teachers"]["test_acc"]) == 2
    records = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records[0]["train_teacher_weight"]) == 2


def test_tpu_notebook_runs_the_paper_config_at_a_tiny_size(quickstart, tmp_path):
    """tpu.ipynb with configs/vgg8.py shrunk to CPU size (digits, resnet8, one epoch, the quickstart's teachers)
    on 8 CPU devices standing in for the 8 cores of a TPU board: the mesh, the layout and a data-parallel run."""
    _, quick_dir, _ = quickstart
    teachers = sorted(str(p) for p in (quick_dir / "run" / "teachers").glob("teacher_*"))
    params = {"WORKDIR": str(tmp_path / "run"), "TEACHER_CHECKPOINTS": teachers,
              "OVERRIDES": {"data.source": "digits", "data.name": "digits", "data.num_classes": 10,
                            "data.cache_dir": str(quick_dir / "cache"), "student.model": "resnet8",
                            "student.width": 0.25, "teachers.model": "resnet8", "num_epochs": 1,
                            "eval_batch_size": 120, "distill.beta": 2.0}}
    nb, seconds = execute("tpu.ipynb", params, tmp_path, cpu_devices=8)
    print(f"\ntpu.ipynb ran in {seconds:.1f} s")
    text = outputs_text(nb)
    assert "8 device(s), 8 local, process 0 of 1" in text and "Mesh('data': 8" in text
    assert "device 7: rows 56:64 -> shard (8, 32, 32, 3)" in text  # 64 images over 8 devices
    assert "(3, 3, 3, 64) P() -> (3, 3, 3, 64) on every device" in text
    assert "student final / best test top-1" in text
    assert images(nb) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student"] == "resnet8" and summary["mesh"]["devices"] == 8
    assert summary["teachers"]["dirs"] == teachers


@pytest.mark.parametrize("name", ["quickstart.ipynb", "tpu.ipynb"])
def test_committed_notebooks_are_clean(name):
    """Saved without outputs (strip them before committing), small, valid, one parameters cell, a Colab badge."""
    path = NOTEBOOKS / name
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{name} is {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        assert len(cell.source) < MAX_CELL_CHARS, f"{name} cell {i} has {len(cell.source)} characters"
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has outputs"
    parameters_cell(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    badge = f"https://colab.research.google.com/github/<org>/demkd_jax/blob/main/notebooks/{name}"
    assert badge in nb.cells[0].source
    assert badge in (REPO / "README.md").read_text()

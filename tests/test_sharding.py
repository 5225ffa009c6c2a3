"""Data parallelism (demkd_jax/parallel.py): 1 device and 8 devices give the same run.

The main pytest process has one CPU device, so the trainer runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/sharding_worker.py). One subprocess trains the same
tiny DE-MKD run (two frozen resnet8 teachers, a resnet8 student with BatchNorm, the connectors' BatchNorm,
the feature term on in epoch 2) on a 1-device mesh, on the 8-device mesh, on the 8-device mesh with the dataset
row-sharded, and once more resuming on 8 devices from a checkpoint written on 1 device; then compares.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import repo_env

from demkd_jax import checkpoint as ckpt_lib
from demkd_jax import config as config_lib
from demkd_jax import models, parallel

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
BATCH = 16
STEPS_PER_EPOCH = 96 // BATCH
# float32 reductions in another order (8 partial sums and an all-reduce instead of one sum) differ by ~1e-7
# relative per step; after the 12 steps of the run below the states agree to ~1e-6 of their scale.
# Per-device BatchNorm statistics change a forward by > 1e-1 (the negative control below).
RTOL = 1e-4
# The learning rate of the comparison. At test_train's 0.05 this tiny run is chaotic: a 1e-7 relative
# perturbation of the initial state grows to 1e-2 within 4 steps on one device alone, so no tolerance could
# tell reduction order from a bug. At 0.01 the same perturbation stays at the rounding level.
LEARNING_RATE = 0.0025

def base_overrides(data_dir, cache_dir, teacher_dirs) -> dict:
    return {
        "data.source": "npz", "data.path": str(data_dir), "data.name": "tiny", "data.num_classes": NUM_CLASSES,
        "data.cache_dir": str(cache_dir),
        "student.model": "resnet8", "student.width": 0.25,
        "teachers.checkpoints": [str(d) for d in teacher_dirs],
        "distill.method": "demkd", "distill.features": True, "distill.warmup_epochs": 2,
        "num_epochs": 2, "batch_size": BATCH, "eval_batch_size": 8,
        "optim.learning_rate": LEARNING_RATE, "progress_bar": False, "log_every_steps": 3,
        "checkpoint.keep_last": 3,
    }


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """The tiny npz dataset of test_train (96 train / 37 test) and two random resnet8 teachers."""
    root = tmp_path_factory.mktemp("sharding")
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (NUM_CLASSES, 3))
    for name, n in (("train", 96), ("test", 37)):
        labels = np.arange(n) % NUM_CLASSES
        images = rng.integers(0, 64, (n, 32, 32, 3)) + palette[labels][:, None, None, :] // 2
        np.savez(root / f"tiny_{name}.npz", image=np.clip(images, 0, 255).astype(np.uint8), label=labels)
    teacher = models.create_model("resnet8", NUM_CLASSES, width=0.5)
    dirs = []
    for k in range(2):
        v = jax.device_get(models.init_variables(teacher, jax.random.PRNGKey(100 + k)))
        # Non-trivial running statistics, so that folding them into the convolutions matters.
        v["batch_stats"] = jax.tree_util.tree_map(
            lambda a, k=k: (rng.uniform(0.5, 1.5, a.shape) if a.ndim else a).astype(np.float32), v["batch_stats"])
        dirs.append(ckpt_lib.save_teacher(root / f"teacher_{k}", v, model_name="resnet8", num_classes=NUM_CLASSES,
                                          width=0.5))
    return root, dirs


@pytest.fixture(scope="module")
def eight_devices(tiny_inputs):
    """Runs tests/sharding_worker.py once with 8 CPU devices; returns its report and the final states."""
    root, dirs = tiny_inputs
    out = root / "out"
    out.mkdir()
    spec = {
        "config": base_overrides(root, root / "cache", dirs),
        "runs": [
            {"name": "one", "workdir": str(root / "one"), "config": {"mesh.num_devices": 1}},
            {"name": "eight", "workdir": str(root / "eight"), "config": {"mesh.num_devices": -1}, "inspect": True},
            # Epoch 1 on one device, then epoch 2 on eight from its checkpoint, with the dataset row-sharded.
            {"name": "resume_1", "workdir": str(root / "moved"), "config": {"mesh.num_devices": 1, "num_epochs": 1}},
            {"name": "resume_8", "workdir": str(root / "moved"),
             "config": {"mesh.num_devices": 8, "mesh.dataset": "sharded"}},
        ],
        "invalid": {"batch_12": {"batch_size": 12}, "eval_12": {"eval_batch_size": 12},
                    "too_many_devices": {"mesh.num_devices": 16}, "bad_dataset": {"mesh.dataset": "striped"},
                    "bad_distributed": {"distributed": "maybe"},
                    "batch_12_on_4": {"batch_size": 12, "mesh.num_devices": 4}},
    }
    (root / "spec.json").write_text(json.dumps(spec))
    env = repo_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                   JAX_DISABLE_MOST_OPTIMIZATIONS="true")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharding_worker.py"), str(root / "spec.json"),
                           str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    states = {name: dict(np.load(out / f"{name}.npz")) for name in report["runs"]}
    return report, states, proc.stdout


COLLECTIONS = (".params", ".batch_stats", ".opt_state")


def state_differences(a: dict, b: dict) -> dict:
    """Per collection of two flattened states (parameters, BatchNorm statistics, optimizer state): the
    largest absolute difference and that divided by the collection's largest magnitude (norm-wise relative
    error: a leaf that is pure rounding noise, e.g. the momentum of the connectors' conv bias, whose gradient
    is zero in exact arithmetic because BatchNorm follows the conv, is judged at the scale of its collection)."""
    assert a.keys() == b.keys()
    out = {}
    for prefix in COLLECTIONS:
        keys = [k for k in a if k.startswith(prefix) and b[k].size]
        diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in keys)
        scale = max(float(np.max(np.abs(b[k]))) for k in keys)
        out[prefix.lstrip(".")] = {"max_abs": diff, "relative": diff / scale}
    return out


def assert_states_close(a: dict, b: dict, rtol: float = RTOL, **per_collection: float) -> dict:
    diffs = state_differences(a, b)
    for name, d in diffs.items():
        assert d["relative"] <= per_collection.get(name, rtol), (name, diffs)
    return diffs


def test_one_and_eight_devices_give_the_same_run(eight_devices):
    report, states, stdout = eight_devices
    assert report["device_count"] == 8
    one, eight = report["runs"]["one"], report["runs"]["eight"]
    assert one["mesh"]["devices"] == 1 and eight["mesh"]["devices"] == 8
    assert eight["mesh"]["per_device_batch"] == BATCH // 8
    assert len(one["steps"]) == len(eight["steps"]) == 2 * STEPS_PER_EPOCH
    # The loss curve, step by step (the feature term is on from step 7).
    loss_1 = np.array([s["loss"] for s in one["steps"]])
    loss_8 = np.array([s["loss"] for s in eight["steps"]])
    np.testing.assert_allclose(loss_8, loss_1, rtol=RTOL)
    assert np.all(np.isfinite([s["feature"] for s in eight["steps"]]))
    assert eight["steps"][-1]["feature"] > 0
    # Every parameter, BatchNorm statistic (student and connectors) and momentum buffer.
    diff = assert_states_close(states["eight"], states["one"])
    print(f"\n1 vs 8 devices: max |loss diff| {np.max(np.abs(loss_8 - loss_1)):.3g} "
          f"(relative {np.max(np.abs(loss_8 - loss_1) / loss_1):.3g}); max |diff| / max |value|: "
          + ", ".join(f"{k} {d['max_abs']:.3g} / {d['max_abs'] / d['relative']:.3g} = {d['relative']:.3g}"
                      for k, d in diff.items()))
    assert any("connectors" in k and "batch_stats" in k for k in states["one"]), "connector BN is exercised"
    # Per-epoch records: losses, per-teacher weights and entropies, test accuracy.
    for r1, r8 in zip(one["metrics"], eight["metrics"]):
        for key in ("train_loss", "train_ce", "train_logit", "train_feature", "train_teacher_weight",
                    "train_teacher_entropy"):
            np.testing.assert_allclose(r8[key], r1[key], rtol=RTOL, err_msg=key)
        assert r8["test_acc"] == r1["test_acc"]


def test_per_device_batchnorm_would_have_failed(eight_devices):
    """Negative control: the tolerance above catches BatchNorm statistics computed per device."""
    control = eight_devices[0]["local_bn"]
    assert control["global_vs_one_logits"] < 1e-5 and control["global_vs_one_stats"] < 1e-5, control
    assert control["local_vs_one_logits"] > 1e3 * RTOL, control


def test_the_eight_device_run_is_data_parallel(eight_devices):
    report = eight_devices[0]
    eight = report["runs"]["eight"]
    # Inputs: state, teachers, permutation replicated over the 8 devices; the dataset replicated.
    args = eight["args"]
    for key in ("state", "teachers", "perm"):
        assert args[key] == {"replicated": True, "num_devices": [8]}, (key, args[key])
    assert args["images_spec"] == "P()"
    # The state stays replicated on all 8 devices after every step, the metrics too.
    for s in eight["steps"]:
        assert s["state"] == {"replicated": True, "num_devices": [8]}
        assert s["metrics"] == {"replicated": True, "num_devices": [8]}
    # The partitioned program: each device convolves its 2 of the 16 examples (the student's, the teachers',
    # the connectors' forward and backward), and batch reductions are cross-device all-reduces.
    compiled = eight["compiled"]
    batches = {int(b): n for b, n in compiled["conv_output_batches"].items()}
    assert set(batches) == {BATCH // 8} and batches[BATCH // 8] >= 30, batches
    assert compiled["all_reduce"] > 0


def test_no_recompilation(eight_devices):
    """One compilation of the step per run (state outputs keep the input shardings), and two of the evaluation
    (the teachers once, the student once for all its epochs)."""
    report = eight_devices[0]
    for name, run in report["runs"].items():
        assert run["compiles"].get("jit(train_step)") == 1, (name, run["compiles"])
        assert run["compiles"].get("jit(eval_fn)") == 2, (name, run["compiles"])
        assert run["cache_size"] == 1, name


def test_resume_on_another_device_count_with_a_sharded_dataset(eight_devices):
    """Epoch 1 on one device; its checkpoint continues on 8 devices (Orbax reshards onto the new mesh) with
    the dataset row-sharded (the batch gathered across devices): still the one-device run."""
    report, states, _ = eight_devices
    first, second = report["runs"]["resume_1"], report["runs"]["resume_8"]
    assert len(first["steps"]) == len(second["steps"]) == STEPS_PER_EPOCH
    assert second["mesh"]["devices"] == 8 and second["mesh"]["dataset"] == "sharded"
    assert second["args"]["images_spec"] == "P('data',)"
    assert second["args"]["images_shape"][0] == 96 and second["args"]["images_shard_shape"][0] == 96 // 8
    assert second["args"]["state"] == {"replicated": True, "num_devices": [8]}  # the restored state
    losses = [s["loss"] for s in first["steps"] + second["steps"]]
    np.testing.assert_allclose(losses, [s["loss"] for s in report["runs"]["one"]["steps"]], rtol=RTOL)
    assert_states_close(states["resume_8"], states["one"])
    assert len(second["metrics"]) == 2


def test_batch_not_divisible_by_the_devices_is_refused(eight_devices):
    errors = eight_devices[0]["config_errors"]
    assert errors["batch_12"].startswith("global batch size 12 is not divisible by the 8 devices"), errors["batch_12"]
    assert "use a multiple of 8" in errors["batch_12"]
    assert errors["eval_12"].startswith("eval batch size 12 is not divisible by the 8 devices")
    assert errors["batch_12_on_4"] is None  # 12 = 4 x 3 on a 4-device mesh
    assert "config.mesh.num_devices must be -1 (all 8 devices) or between 1 and 8, got 16" in errors["too_many_devices"]
    assert "unknown config.mesh.dataset 'striped'" in errors["bad_dataset"]
    assert "unknown config.distributed 'maybe'" in errors["bad_distributed"]


def test_the_log_names_the_mesh(eight_devices):
    stdout = eight_devices[2]
    assert stdout.count("mesh: 8 cpu device(s) on axis 'data' (1 process(es)), 2 examples per device") == 2


# ----------------------------------------------------------------------------------------------------------
# In this process (one device)


def test_cluster_detection(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                 "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                 "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.detect_cluster() is None
    assert parallel.initialize_distributed("auto") is False  # nothing to join: a single-process run
    assert parallel.initialize_distributed("off") is False
    with pytest.raises(ValueError, match="unknown config.distributed 'yes'"):
        parallel.initialize_distributed("yes")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.detect_cluster() is None  # a one-task SLURM job is a single process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.detect_cluster() == "SLURM job 7 with 4 tasks"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0")
    assert parallel.detect_cluster() is None  # a single-host TPU VM
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3")
    assert parallel.detect_cluster() == "TPU pod with 4 hosts (TPU_WORKER_HOSTNAMES)"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert parallel.detect_cluster().startswith("JAX_COORDINATOR_ADDRESS")


def test_distributed_after_backend_start_is_explained(monkeypatch):
    jax.devices()  # this process has long started its backend
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(RuntimeError, match="already used a JAX device"):
        parallel.initialize_distributed("auto")


def test_default_config_uses_every_device():
    config = config_lib.base_config()
    assert config.mesh.num_devices == -1 and config.mesh.dataset == "replicated" and config.distributed == "auto"
    mesh = parallel.make_mesh(config)
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    assert parallel.config_problem(config) is None


# ----------------------------------------------------------------------------------------------------------
# Two processes (multi-host on one machine): slow, run with `python -m pytest -m slow tests/test_sharding.py`


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(root, spec: dict, name: str, processes: int, devices_per_process: int) -> list[subprocess.CompletedProcess]:
    out = root / name
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(spec))
    env = repo_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", JAX_PLATFORMS="cpu",
                   JAX_DISABLE_MOST_OPTIMIZATIONS="true")
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    cmd = [sys.executable, str(REPO / "tests" / "sharding_worker.py"), str(out / "spec.json"), str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out,
                              env={**env, "JAX_PROCESS_ID": str(i)} if processes > 1 else env)
             for i in range(processes)]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return results


@pytest.mark.slow
def test_two_processes_give_the_one_process_run(tiny_inputs):
    """``jax.distributed`` on one machine: 2 processes x 4 CPU devices (one 8-device mesh, cross-process
    collectives over gloo) run the whole pipeline -- train two teachers at once, export them, distil DE-MKD
    from them -- and get the run of one process with 8 devices. Only process 0 prints and writes files; every
    process calls Orbax, which writes each checkpoint once."""
    root, _ = tiny_inputs
    config = base_overrides(root, root / "cache", ())
    config.update({"teachers.checkpoints": [], "teachers.model": "resnet8", "teachers.num": 2,
                   "teachers.width": 0.5, "teachers.num_epochs": 1, "teachers.learning_rate": LEARNING_RATE,
                   # Distilling from trained teachers, this tiny student is chaotic at lr 0.01 (rounding noise on
                   # one device alone grows to 1e-2 in 3 steps), and still amplifies it at 0.002: measured 2 x 4
                   # vs 1 x 8 devices, parameters 1.3e-5 relative on jax 0.10.2 and 0.11.2 but 5.4e-4 on 0.12.0.1
                   # (momentum 4e-4 vs 1.8e-2), losses 4e-7 on all. At 0.0005 every version stays at the rounding
                   # level: parameters 5e-8 (0.10.2, 0.11.2) / 1e-7 (0.12.0.1), momentum 3e-7 / 5e-7.
                   "optim.learning_rate": 0.0005,
                   "num_epochs": 1, "distill.feature_start_epoch": 1})  # 6 teacher + 6 student steps, features on
    runs = lambda where: [{"name": "pipeline", "workdir": str(root / where / "run")}]  # noqa: E731
    # The reference: one process with the same 8-device mesh. (1 vs 8 devices is the fast tests' subject.)
    _launch(root, {"config": config, "runs": runs("single"), "controls": False}, "single", 1, 8)
    multi = _launch(root, {"config": config, "runs": runs("multi"), "controls": False}, "multi", 2, 4)
    reference = json.loads((root / "single" / "report.json").read_text())["runs"]["pipeline"]
    reports = [json.loads((root / "multi" / f"process_{i}" / "report.json").read_text()) for i in range(2)]
    for i, report in enumerate(reports):
        assert (report["process_count"], report["device_count"], report["local_device_count"]) == (2, 8, 4)
        run = report["runs"]["pipeline"]
        assert run["mesh"]["devices"] == 8 and run["mesh"]["processes"] == 2
        assert run["args"]["state"] == {"replicated": True, "num_devices": [8]}
        np.testing.assert_allclose([s["loss"] for s in run["steps"]], [s["loss"] for s in reference["steps"]],
                                   rtol=RTOL)
        state = dict(np.load(root / "multi" / f"process_{i}" / "pipeline.npz"))
        assert_states_close(state, dict(np.load(root / "single" / "pipeline.npz")))
    # Teachers: trained 1 epoch on 8 devices over 2 processes, exported once, loadable.
    for k in range(2):
        t_multi, meta = ckpt_lib.load_teacher(root / "multi" / "run" / "teachers" / f"teacher_{k}")
        t_single, _ = ckpt_lib.load_teacher(root / "single" / "run" / "teachers" / f"teacher_{k}")
        assert meta["member"] == k
        flat_multi, flat_single = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
                                   for t in (t_multi, t_single))
        np.testing.assert_allclose(flat_multi, flat_single, rtol=0, atol=RTOL * np.max(np.abs(flat_single)))
    assert "summary:" in multi[0].stdout and "mesh: 8 cpu device(s)" in multi[0].stdout
    assert "summary:" not in multi[1].stdout and "epoch 1/2" not in multi[1].stdout  # process 1 is quiet
    assert (root / "multi" / "run" / "summary.json").is_file()

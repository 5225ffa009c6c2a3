"""Reliability (issue 5): crash-exact resume, corrupted checkpoints, the non-finite guard, bad inputs, bounded disk;
(issue 17) verified teachers, crash-safe metrics, locked workdirs, config changes on resume, SIGINT/SIGTERM, and
a table of hostile CLI inputs.

Everything runs the real trainer on the tiny npz dataset of ``conftest.py`` (resnet8 at width 0.25, 96 training
images, batch 16: 6 steps per epoch), in this process or through the CLI in a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_CLASSES, TINY_OVERRIDES, apply_overrides, repo_env, write_tiny_npz

from demkd_jax import checkpoint as ckpt_lib
from demkd_jax import config as config_lib
from demkd_jax import data as data_lib
from demkd_jax import models, train, validation

# Reading a corrupted checkpoint leaves tensorstore futures whose (expected, already reported) error nobody
# retrieves; pytest would report them as unraisable-exception warnings.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SPE = 6  # steps per epoch of the tiny run
INPUT_ERRORS = (config_lib.ConfigError, ckpt_lib.CheckpointError, data_lib.DataError)


# ----------------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations (jit, eager op dispatch, anything) inside the block."""
    events: list[str] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def restore_raw(step_dir: pathlib.Path) -> dict:
    """A training checkpoint's state as stored (no target structure: independent of the trainer's setup)."""
    with ocp.StandardCheckpointer() as ckptr:
        return jax.tree_util.tree_map(np.asarray, ckptr.restore(pathlib.Path(step_dir) / "default"))


def assert_bit_identical(a: Any, b: Any) -> None:
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_structure(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)[0], jax.tree_util.tree_structure(b)
    assert tree_a == tree_b
    assert flat_a
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def step_dirs(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def metrics_records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


TIMING_KEYS = ("epoch_time_s", "img_per_s")


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def truncate_file(step_dir: pathlib.Path) -> str:
    f = largest_data_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f"truncated {f.name}"


def delete_file(step_dir: pathlib.Path) -> str:
    f = largest_data_file(step_dir)
    f.unlink()
    return f"deleted {f.name}"


def garbage_bytes(step_dir: pathlib.Path) -> str:
    f = largest_data_file(step_dir)
    b = bytearray(f.read_bytes())
    i = len(b) // 2
    b[i:i + 16] = np.random.default_rng(0).integers(0, 256, len(b[i:i + 16]), dtype=np.uint8).tobytes()
    f.write_bytes(bytes(b))
    return f"garbage in {f.name}"


def subprocess_env(jax_cache: pathlib.Path | None = None, **extra: str) -> dict:
    env = repo_env(JAX_DISABLE_MOST_OPTIMIZATIONS="true", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if jax_cache is not None:  # restarts load the compiled step instead of compiling it again
        env.update(JAX_COMPILATION_CACHE_DIR=str(jax_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    env.update(extra)
    return env


def write_config_file(path: pathlib.Path, overrides: dict) -> pathlib.Path:
    """A ``configs/*.py``-style file: the base config with ``overrides`` (for ``--config``)."""
    path.write_text(
        "from demkd_jax.config import base_config\n\n\n"
        "def get_config():\n"
        "    c = base_config()\n"
        f"    for key, value in {overrides!r}.items():\n"
        "        target = c\n"
        "        *path, leaf = key.split('.')\n"
        "        for p in path:\n"
        "            target = target[p]\n"
        "        target[leaf] = value\n"
        "    return c\n")
    return path


def cli(config_file: pathlib.Path, workdir: pathlib.Path, *flags: str, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "demkd_jax.main", "--config", str(config_file), "--workdir", str(workdir), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir.parent,
                          env=env or subprocess_env())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def write_teacher_meta(directory: pathlib.Path, model: str, num_classes: int = TINY_CLASSES, width: float = 1.0,
                       *, with_variables: bool = True) -> str:
    """A teacher directory with only its teacher.json (and a stub variables/_METADATA): enough for every check
    that runs before the arrays are read."""
    directory.mkdir(parents=True, exist_ok=True)
    ckpt_lib.write_json_atomic(directory / ckpt_lib.TEACHER_META,
                               {"format": ckpt_lib.TEACHER_FORMAT, "model": model, "num_classes": num_classes,
                                "width": width})
    if with_variables:
        (directory / ckpt_lib.TEACHER_VARIABLES).mkdir(exist_ok=True)
        (directory / ckpt_lib.TEACHER_VARIABLES / "_METADATA").write_text("{}")
    return str(directory)


def rewrite_teacher_value(directory: pathlib.Path, value: float) -> None:
    """A teacher whose arrays are a valid Orbax checkpoint differing from what was saved in one float."""
    path = directory / ckpt_lib.TEACHER_VARIABLES
    with ocp.StandardCheckpointer() as ckptr:
        variables = jax.tree_util.tree_map(np.array, ckptr.restore(path))
    leaf = jax.tree_util.tree_leaves(variables["params"])[0]
    leaf.reshape(-1)[0] = value
    shutil.rmtree(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, variables)


def save_random_teacher(directory: pathlib.Path, model_name: str, seed: int, width: float = 0.25) -> str:
    model = models.create_model(model_name, TINY_CLASSES, width=width)
    variables = jax.jit(lambda k: models.init_variables(model, k))(jax.random.PRNGKey(seed))
    ckpt_lib.save_teacher(directory, variables, model_name=model_name, num_classes=TINY_CLASSES, width=width)
    return str(directory)


# ----------------------------------------------------------------------------------------------------------
# 4. Bad inputs: one-line errors that name the value and what was expected, before any compile or write


@dataclasses.dataclass(frozen=True)
class BadInput:
    id: str
    # (ctx) -> config overrides (in-process) or, for cli=True, extra CLI flags
    make: Callable[["BadInputContext"], Any]
    expect: tuple[str, ...]  # substrings of the message: the bad value and what was expected
    cli: bool = False
    env: dict | None = None  # extra environment of a CLI case
    reads_arrays: bool = False  # the check needs the teachers' arrays (their checksum is computed on the device)


@dataclasses.dataclass
class BadInputContext:
    tmp: pathlib.Path

    def teachers(self, *specs: tuple[str, int]) -> tuple[str, ...]:
        return tuple(write_teacher_meta(self.tmp / f"t{i}_{m}_{c}", m, c) for i, (m, c) in enumerate(specs))

    def npz(self, **kwargs) -> str:
        return str(write_tiny_npz(self.tmp / "npz", **kwargs))


def _two_resnet8(ctx):
    return ctx.teachers(("resnet8", TINY_CLASSES), ("resnet8", TINY_CLASSES))


def _demkd(ctx, **extra):
    return {"distill.method": "demkd", "teachers.checkpoints": _two_resnet8(ctx), **extra}


def _chmod_readonly(ctx):
    locked = ctx.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user that chmod does not restrict (root)")
    return {"__workdir__": str(locked / "run")}


def _workdir_is_file(ctx):
    f = ctx.tmp / "a_file"
    f.write_text("not a directory")
    return {"__workdir__": str(f)}


def _corrupt_teacher_meta(ctx):
    dirs = _two_resnet8(ctx)
    (pathlib.Path(dirs[1]) / ckpt_lib.TEACHER_META).write_text('{"format": "demkd_jax.teacher/1", "model": ')
    return {"distill.method": "demkd", "teachers.checkpoints": dirs}


def _teacher_without_variables(ctx):
    dirs = _two_resnet8(ctx)
    shutil.rmtree(pathlib.Path(dirs[0]) / ckpt_lib.TEACHER_VARIABLES)
    return {"distill.method": "demkd", "teachers.checkpoints": dirs}


def _not_a_teacher(ctx):
    plain = ctx.tmp / "some_run"
    plain.mkdir()
    return {"distill.method": "demkd", "teachers.checkpoints": (str(plain), _two_resnet8(ctx)[0])}


def _empty_folder(ctx):
    root = ctx.tmp / "images"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "test" / "cat").mkdir(parents=True)
    return {"data.source": "folder", "data.path": str(root), "data.num_classes": -1}


def _corrupted_archive(ctx):
    archive = ctx.tmp / "cifar-100-python.tar.gz"
    archive.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"data.source": "pickle", "data.name": "cifar100", "data.path": str(archive)}


def _teacher_path_is_a_file(ctx):
    f = ctx.tmp / "teacher.pth"
    f.write_bytes(b"not a directory")
    return {"distill.method": "demkd", "teachers.checkpoints": (str(f), _two_resnet8(ctx)[0])}


def _npz_of_random_bytes(ctx):
    root = ctx.tmp / "npz_garbage"
    write_tiny_npz(root)
    (root / "tiny_train.npz").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"data.path": str(root)}


def _teacher_with_a_changed_value(ctx):
    dirs = [save_random_teacher(ctx.tmp / f"teacher_{k}", "resnet8", seed=k) for k in range(2)]
    rewrite_teacher_value(pathlib.Path(dirs[1]), 0.5)
    return {"distill.method": "demkd", "teachers.checkpoints": tuple(dirs)}


BAD_INPUTS = [
    BadInput("unknown_model", lambda ctx: {"student.model": "resnet9"},
             ("unknown model name 'resnet9'", "expected one of", "resnet8")),
    BadInput("unknown_teacher_model", lambda ctx: {"distill.method": "demkd", "teachers.model": "vgg14"},
             ("unknown model name 'vgg14'", "config.teachers.model", "expected one of")),
    BadInput("unknown_method", lambda ctx: {"distill.method": "dkdd"},
             ("unknown method 'dkdd'", "expected one of", "demkd")),
    BadInput("unknown_weighting_scheme", lambda ctx: _demkd(ctx, **{"distill.weights": "entropy"}),
             ("unknown config.distill.weights 'entropy'", "expected one of", "camkd")),
    BadInput("teacher_of_another_architecture", lambda ctx: _demkd(ctx, **{"teachers.model": "resnet14"}),
             ("holds a 'resnet8'", "expects 'resnet14'")),
    BadInput("teacher_classes_differ_from_data",
             lambda ctx: {"distill.method": "demkd", "teachers.checkpoints": ctx.teachers(("resnet8", 100),
                                                                                         ("resnet8", 100))},
             ("has 100 classes", "the data has 10")),
    BadInput("mixed_teacher_architectures",
             lambda ctx: {"distill.method": "demkd",
                          "teachers.checkpoints": ctx.teachers(("resnet8", TINY_CLASSES), ("resnet14", TINY_CLASSES))},
             ("mixed teacher architectures", "resnet8", "resnet14", "share one architecture")),
    BadInput("one_teacher_for_k_minus_1_weights",
             lambda ctx: {"distill.method": "demkd", "teachers.checkpoints": _two_resnet8(ctx)[:1]},
             ("with 1 teacher", "divide by K - 1", "K must be >= 2")),
    BadInput("single_teacher_method_with_two", lambda ctx: {"distill.method": "kd",
                                                            "teachers.checkpoints": _two_resnet8(ctx)},
             ("method 'kd' distils from exactly 1 teacher, got 2",)),
    BadInput("teacher_dir_missing",
             lambda ctx: {"distill.method": "demkd", "teachers.checkpoints": (str(ctx.tmp / "nope"),
                                                                             _two_resnet8(ctx)[0])},
             ("teacher checkpoint directory", "nope' does not exist")),
    BadInput("teacher_metadata_corrupted", _corrupt_teacher_meta, ("corrupted teacher metadata", "teacher.json")),
    BadInput("not_a_teacher_checkpoint", _not_a_teacher, ("some_run' is not a demkd_jax teacher checkpoint",
                                                          "no teacher.json")),
    BadInput("teacher_variables_missing", _teacher_without_variables, ("is incomplete", "variables/", "missing")),
    BadInput("hint_layer_out_of_range", lambda ctx: _demkd(ctx, **{"distill.method": "fitnet_mkd",
                                                                   "distill.hint_layer": 7}),
             ("config.distill.hint_layer=7 is out of range", "4 feature maps", "expected an index in 0..3")),
    BadInput("missing_data_path", lambda ctx: {"data.path": str(ctx.tmp / "no_such_data")},
             ("no_such_data does not exist",)),
    BadInput("unknown_data_source", lambda ctx: {"data.source": "lmdb"},
             ("unknown data.source 'lmdb'", "expected one of")),
    BadInput("empty_image_folder", _empty_folder, ("has no images under train/", "expected train/<class>/")),
    BadInput("corrupted_archive", _corrupted_archive, ("cifar-100-python.tar.gz is not a readable tar archive",)),
    BadInput("labels_out_of_range", lambda ctx: {"data.path": ctx.npz(label_shift=3)},
             ("labels span [3, 12]", "num_classes=10 needs them in [0, 9]")),
    BadInput("images_of_another_size", lambda ctx: {"data.image_size": 28},
             ("images are 32x32 but data.image_size=28",)),
    BadInput("batch_larger_than_training_set", lambda ctx: {"batch_size": 128},
             ("config.batch_size=128 is larger than the training set (96 images", "expected at most 96")),
    BadInput("global_batch_not_divisible_by_devices", lambda ctx: ["--config.batch_size=15"],
             ("global batch size 15 is not divisible by the 2 devices", "multiple of 2"), cli=True,
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
    BadInput("eval_batch_not_divisible_by_devices", lambda ctx: ["--config.eval_batch_size=7"],
             ("eval batch size 7 is not divisible by the 2 devices",), cli=True,
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
    BadInput("zero_learning_rate", lambda ctx: {"optim.learning_rate": 0.0},
             ("config.optim.learning_rate must be a positive number, got 0.0",)),
    BadInput("negative_learning_rate", lambda ctx: {"optim.learning_rate": -0.1},
             ("config.optim.learning_rate must be a positive number, got -0.1",)),
    BadInput("zero_epochs", lambda ctx: {"num_epochs": 0}, ("config.num_epochs must be a positive integer, got 0",)),
    BadInput("negative_epochs", lambda ctx: {"num_epochs": -3},
             ("config.num_epochs must be a positive integer, got -3",)),
    BadInput("negative_weight_decay", lambda ctx: {"optim.weight_decay": -5e-4},
             ("config.optim.weight_decay must be >= 0, got -0.0005",)),
    BadInput("momentum_of_one", lambda ctx: {"optim.momentum": 1.0},
             ("config.optim.momentum must be in [0, 1), got 1.0",)),
    BadInput("unknown_dtype", lambda ctx: {"dtype": "float8"}, ("unknown config.dtype 'float8'", "expected one of")),
    BadInput("unknown_nonfinite_policy", lambda ctx: {"on_nonfinite": "ignore"},
             ("unknown config.on_nonfinite 'ignore'", "expected one of stop, skip")),
    BadInput("unknown_winograd_mode", lambda ctx: {"teachers.winograd": "yes"},
             ("unknown config.teachers.winograd 'yes'", "expected one of auto, on, off")),
    BadInput("keep_no_checkpoints", lambda ctx: {"checkpoint.keep_last": 0},
             ("config.checkpoint.keep_last must be a positive integer, got 0",)),
    BadInput("unwritable_workdir", _chmod_readonly, ("is not writable",)),
    BadInput("workdir_is_a_file", _workdir_is_file, ("a_file' exists and is not a directory",)),
    BadInput("teacher_path_is_a_file", _teacher_path_is_a_file,
             ("teacher.pth' is a file, expected a teacher checkpoint directory",)),
    BadInput("npz_of_random_bytes", _npz_of_random_bytes,
             ("tiny_train.npz is not a readable .npz file (not a zip archive",)),
    # Fails only once the arrays are read (after the workdir was claimed): the workdir must still be removed.
    BadInput("teacher_fails_verification", _teacher_with_a_changed_value,
             ("teacher_1' is corrupted: its arrays read back with checksum",), reads_arrays=True),
    BadInput("mistyped_config_key", lambda ctx: ["--config.optim.learnin_rate=0.1"],
             ("--config.optim.learnin_rate", "no field 'learnin_rate'", 'did you mean "learning_rate"'), cli=True),
    BadInput("config_value_of_wrong_type", lambda ctx: ["--config.num_epochs=three"],
             ("--config.num_epochs=three", "invalid literal for int()"), cli=True),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.id for c in BAD_INPUTS])
def test_bad_input_fails_fast_with_one_line(case, tmp_path, make_config, tiny_data, tiny_cache):
    ctx = BadInputContext(tmp_path)
    made = case.make(ctx)
    if case.cli:
        overrides = {**TINY_OVERRIDES, "data.path": str(tiny_data), "data.cache_dir": str(tiny_cache)}
        config_file = write_config_file(tmp_path / "config.py", overrides)
        workdir = tmp_path / "run"
        t0 = time.time()
        out = cli(config_file, workdir, *made, env=subprocess_env(**(case.env or {})), timeout=120)
        assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
        lines = error_lines(out.stderr)
        assert len(lines) == 1, out.stderr[-3000:]
        message = lines[0][len("error: "):]
        assert time.time() - t0 < 60
    else:
        overrides = dict(made)
        workdir = pathlib.Path(overrides.pop("__workdir__", tmp_path / "run"))
        config = make_config(**overrides)
        with count_compiles() as compiles:
            with pytest.raises(INPUT_ERRORS) as err:
                train.train_and_evaluate(config, str(workdir))
        message = str(err.value)
        if not case.reads_arrays:
            assert compiles == [], f"compiled {compiles} before failing"
    assert "\n" not in message
    for part in case.expect:
        assert part in message, message
    # Nothing was trained or written: the workdir was not even created (or, a file, is still that file).
    assert not workdir.is_dir()
    BAD_INPUT_MESSAGES[case.id] = message


BAD_INPUT_MESSAGES: dict[str, str] = {}  # filled by the table test (printed with -s by the last test below)


def test_unwritable_workdir_message_where_chmod_does_not_apply(make_config, tmp_path, monkeypatch):
    """The table's chmod case skips as root; the check itself (os.access) is the same for everyone."""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(validation.os, "access", lambda path, mode: not str(path).startswith(str(locked)))
    with pytest.raises(config_lib.ConfigError) as err:
        validation.validate(make_config(), workdir=str(locked / "run"))
    assert str(err.value) == f"workdir {str(locked / 'run')!r} is not writable ({str(locked)!r} denies write access)"


def test_bad_input_table_has_at_least_15_cases():
    assert len(BAD_INPUTS) >= 15 and len({c.id for c in BAD_INPUTS}) == len(BAD_INPUTS)


def test_compile_counter_sees_compiles():
    """The table's "nothing compiled" assertion relies on this listener."""
    with count_compiles() as compiles:
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()
    assert compiles


# ----------------------------------------------------------------------------------------------------------
# 2. Corrupted checkpoints, at the checkpointer level (no training)


def _tiny_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(32,)), jnp.float32)},
            "opt": {"mu": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), "count": jnp.int32(seed)},
            "step": jnp.int32(seed)}


def _saved_checkpointer(directory, steps=(1, 2, 3), accs=None, **kwargs):
    ckpt = ckpt_lib.TrainCheckpointer(directory, log=lambda *_: None, **kwargs)
    for i, s in enumerate(steps):
        ckpt.save(s, _tiny_state(s), test_acc=float(accs[i] if accs else s))
    ckpt.close()


UNIT_CORRUPTIONS = {
    "truncated_data_file": (truncate_file, "cannot read its arrays"),
    "missing_data_file": (delete_file, "cannot read its arrays"),
    "garbage_in_data_file": (garbage_bytes, ""),  # a decode error or a checksum mismatch, by the bytes hit
    "missing_tree_metadata": (lambda s: (s / "default" / "_METADATA").unlink(), "unreadable tree metadata"),
    "garbage_tree_metadata": (lambda s: (s / "default" / "_METADATA").write_text("{\"tree_metadata\": [1, "),
                              "unreadable tree metadata"),
    "garbage_metrics_file": (lambda s: (s / "metrics" / "metrics").write_text("\x00\x01garbage"),
                             "unreadable metrics file"),
    "killed_before_the_state_was_written": (lambda s: shutil.rmtree(s / "default"),
                                            "its state directory 'default' is missing"),
    "one_value_changed": (lambda s: _rewrite_one_value(s), "checksum mismatch"),
    # Without its metrics file a checkpoint cannot be verified: changed or not, it must not be restored.
    "missing_metrics_file_and_one_value_changed": (
        lambda s: ((s / "metrics" / "metrics").unlink(), _rewrite_one_value(s)),
        "it cannot be verified: its metrics file (holding the checksum) is missing"),
    "metrics_file_without_checksum": (
        lambda s: (s / "metrics" / "metrics").write_text('{"test_acc": 3.0}'),
        "it cannot be verified: its metrics file (holding the checksum) is without a checksum"),
}


def _rewrite_one_value(step_dir: pathlib.Path) -> None:
    """A valid Orbax checkpoint whose content differs from what was saved in one float (silent corruption)."""
    state = jax.tree_util.tree_map(np.array, restore_raw(step_dir))  # writable copies
    state["params"]["w"][3, 4] += 1.0
    shutil.rmtree(step_dir / "default")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(step_dir / "default", state)


@pytest.mark.parametrize("kind", list(UNIT_CORRUPTIONS))
def test_corrupted_latest_checkpoint_falls_back_and_is_moved_aside(kind, tmp_path):
    corrupt, reason = UNIT_CORRUPTIONS[kind]
    directory = tmp_path / "checkpoints"
    _saved_checkpointer(directory)
    corrupt(directory / "3")
    lines = []
    ckpt = ckpt_lib.TrainCheckpointer(directory, log=lines.append)
    abstract = jax.eval_shape(lambda: _tiny_state(0))
    step, state = ckpt.restore_latest(abstract)
    assert step == 2
    assert_bit_identical(jax.device_get(state), jax.device_get(_tiny_state(2)))
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith(f"checkpoint step 3 in {directory} is corrupted (") and reason in lines[0]
    assert "moved it aside to 3.corrupt-" in lines[0] and "resuming from step 2" in lines[0]
    names = sorted(p.name for p in directory.iterdir())  # (keep_last=2 had already removed step 1)
    assert len(names) == 2 and names[0] == "2" and names[1].startswith("3.corrupt-")
    # The directory keeps working: step 3 is saved again and Orbax ignores the moved-aside one.
    ckpt.save(3, _tiny_state(3), test_acc=3.0)
    assert list(ckpt.manager.all_steps()) == [2, 3] and any(p.name.startswith("3.corrupt-") for p in directory.iterdir())
    ckpt.close()


def test_every_checkpoint_corrupted_refuses_to_start_over(tmp_path):
    directory = tmp_path / "checkpoints"
    _saved_checkpointer(directory, steps=(1, 2))
    truncate_file(directory / "2")
    (directory / "1" / "default" / "_METADATA").unlink()
    abstract = jax.eval_shape(lambda: _tiny_state(0))
    with pytest.raises(ckpt_lib.CheckpointError) as err:
        ckpt_lib.TrainCheckpointer(directory).restore_latest(abstract)
    msg = str(err.value)
    assert "\n" not in msg and f"no readable checkpoint in {directory}" in msg
    assert "step 2: cannot read its arrays" in msg and "step 1: unreadable tree metadata" in msg
    assert "move that directory away" in msg and "restart_if_all_corrupt" in msg
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"], "nothing may be moved when refusing"
    lines = []
    ckpt = ckpt_lib.TrainCheckpointer(directory, restart_if_all_corrupt=True, log=lines.append)
    assert ckpt.restore_latest(abstract) is None
    assert len(lines) == 1 and "starting from scratch" in lines[0]
    assert step_dirs(tmp_path) == [] and len(list(directory.glob("*.corrupt-*"))) == 2


def test_delete_corrupt_deletes_only_the_bad_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    _saved_checkpointer(directory)
    garbage_bytes(directory / "3")
    lines = []
    ckpt = ckpt_lib.TrainCheckpointer(directory, delete_corrupt=True, log=lines.append)
    step, _ = ckpt.restore_latest(jax.eval_shape(lambda: _tiny_state(0)))
    assert step == 2 and "deleted it" in lines[0]
    assert sorted(p.name for p in directory.iterdir()) == ["2"]


def test_checkpoint_of_another_config_is_an_error_not_corruption(tmp_path):
    directory = tmp_path / "checkpoints"
    _saved_checkpointer(directory, steps=(1,))
    other = jax.eval_shape(lambda: {**_tiny_state(0), "params": {"w": jnp.zeros((64, 16)), "b": jnp.zeros((16,))}})
    with pytest.raises(ckpt_lib.CheckpointError, match="another configuration") as err:
        ckpt_lib.TrainCheckpointer(directory).restore_latest(other)
    assert "\n" not in str(err.value) and "params/w: expected (64, 16), found (64, 32)" in str(err.value)
    assert sorted(p.name for p in directory.iterdir()) == ["1"]


# ----------------------------------------------------------------------------------------------------------
# 5. Disk: the last N plus the best, also across restarts


def test_keeps_last_n_plus_best_across_restarts(tmp_path):
    directory = tmp_path / "checkpoints"
    _saved_checkpointer(directory, steps=(1, 2, 3), accs=(10.0, 50.0, 20.0), keep_last=2)
    assert step_dirs(tmp_path) == [2, 3]
    # A restart must still know step 2 is the best (Orbax writes the metrics only when asked to).
    _saved_checkpointer(directory, steps=(4, 5), accs=(30.0, 25.0), keep_last=2)
    assert step_dirs(tmp_path) == [2, 4, 5]
    _saved_checkpointer(directory, steps=(6,), accs=(60.0,), keep_last=2)
    assert step_dirs(tmp_path) == [5, 6]
    _saved_checkpointer(directory, steps=(7,), accs=(1.0,), keep_last=1, keep_best=False)
    assert step_dirs(tmp_path) == [7]


# ----------------------------------------------------------------------------------------------------------
# End to end (in this process): a 4-epoch run, then damage it


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_data, tiny_cache):
    """An uninterrupted 4-epoch run (keep the last 2 checkpoints + the best); the reference of the tests below."""
    from conftest import apply_overrides

    def config(**overrides):
        c = config_lib.base_config()
        apply_overrides(c, {**TINY_OVERRIDES, "data.path": str(tiny_data), "data.cache_dir": str(tiny_cache),
                            "num_epochs": 4, "checkpoint.keep_last": 2})
        return apply_overrides(c, overrides)

    workdir = tmp_path_factory.mktemp("base") / "run"
    summary = train.train_and_evaluate(config(), str(workdir))
    final = restore_raw(workdir / "checkpoints" / str(4 * SPE))
    return config, workdir, summary, final, metrics_records(workdir)


def test_disk_holds_last_n_plus_best(base_run):
    _, workdir, _, _, records = base_run
    kept = step_dirs(workdir)
    assert len(kept) <= 2 + 1 and {3 * SPE, 4 * SPE} <= set(kept)
    best = max(r["test_acc"] for r in records)
    assert any(r["test_acc"] == best for r in records if r["step"] in kept), (kept, records)
    assert not [p for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]


@pytest.mark.parametrize("corrupt", [truncate_file, delete_file, garbage_bytes],
                         ids=["truncated_file", "missing_file", "garbage_bytes"])
def test_run_with_corrupted_latest_checkpoint_falls_back_and_finishes_identically(corrupt, base_run, tmp_path,
                                                                                     capsys):
    config, base, summary, final, records = base_run
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    latest = workdir / "checkpoints" / str(4 * SPE)
    corrupt(latest)
    capsys.readouterr()
    resumed = train.train_and_evaluate(config(), str(workdir))
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if "is corrupted" in line]
    assert len(said) == 1, out
    assert said[0].startswith(f"checkpoint step {4 * SPE} in ") and f"resuming from step {3 * SPE}" in said[0]
    assert f"resumed from {workdir / 'checkpoints'} at step {3 * SPE}" in "\n".join(out)
    # The good checkpoint was used, the bad one is kept aside, the run finished exactly as the uninterrupted one.
    assert len(list((workdir / "checkpoints").glob(f"{4 * SPE}.corrupt-*"))) == 1
    assert_bit_identical(restore_raw(latest), final)
    assert without_timing(metrics_records(workdir)) == without_timing(records)
    assert resumed["final_test_acc"] == summary["final_test_acc"]


# ----------------------------------------------------------------------------------------------------------
# 3. Non-finite values


def test_nonfinite_loss_stops_before_saving_and_keeps_the_last_checkpoint(base_run, tmp_path):
    config, base, _, final, records = base_run
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    before = step_dirs(workdir)
    # Resume at the end of epoch 4 with a learning rate that blows the weights up in the next steps.
    with pytest.raises(train.NonFiniteError) as err:
        train.train_and_evaluate(config(**{"num_epochs": 6, "optim.learning_rate": 1e30,
                                           "checkpoint.allow_config_change": True}), str(workdir))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("non-finite ")
    bad_step = int(msg.split(" at step ")[1].split(";")[0])
    assert 4 * SPE < bad_step <= 5 * SPE
    assert any(what in msg for what in ("loss term(s) ce", "total loss", "gradients", "parameter update"))
    assert "the run stopped before saving it" in msg
    # Nothing was saved; every checkpoint on disk is finite and the latest is bit-identical to before.
    assert step_dirs(workdir) == before
    for s in before:
        state = restore_raw(workdir / "checkpoints" / str(s))
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state) if x.dtype.kind == "f")
    assert_bit_identical(restore_raw(workdir / "checkpoints" / str(4 * SPE)), final)
    assert without_timing(metrics_records(workdir)) == without_timing(records)


def test_skip_policy_drops_nonfinite_steps_and_counts_them(make_config, tmp_path):
    workdir = tmp_path / "run"
    summary = train.train_and_evaluate(make_config(**{"optim.learning_rate": 1e30, "on_nonfinite": "skip"}),
                                       str(workdir))
    records = metrics_records(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert summary["skipped_steps"] == sum(r["skipped_steps"] for r in records) > 0
    for r in records:
        assert all(np.isfinite(v) for k, v in r.items() if k.startswith("train_")), r
    for s in step_dirs(workdir):
        state = restore_raw(workdir / "checkpoints" / str(s))
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state) if x.dtype.kind == "f")


def test_cli_reports_a_nonfinite_loss_in_one_line(tmp_path, tiny_data, tiny_cache):
    overrides = {**TINY_OVERRIDES, "data.path": str(tiny_data), "data.cache_dir": str(tiny_cache),
                 "optim.learning_rate": 1e30}
    workdir = tmp_path / "run"
    out = cli(write_config_file(tmp_path / "config.py", overrides), workdir)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: non-finite ") and " at step 2;" in lines[0], out.stderr
    assert not (workdir / "checkpoints").exists() or step_dirs(workdir) == []


# ----------------------------------------------------------------------------------------------------------
# 1. Crash-exact resume: SIGKILL at five random moments


@pytest.fixture(scope="module")
def kill_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_teachers")
    return tuple(save_random_teacher(root / f"teacher_{k}", "resnet8", seed=k) for k in range(2))


KILL_TRAIN_IMAGES = 480  # 30 steps per epoch: long enough for a kill to land among the training steps


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _tmp_dirs(checkpoints: pathlib.Path) -> list[str]:
    if not checkpoints.is_dir():
        return []
    return [p.name for p in checkpoints.iterdir() if ".orbax-checkpoint-tmp" in p.name]


def _kill_at(kind: str, rng: random.Random, proc: subprocess.Popen, log: pathlib.Path,
             checkpoints: pathlib.Path, t_launch: float) -> str:
    """Waits for the moment of ``kind`` (plus a seeded random delay), then SIGKILLs the run."""
    existing = set(step_dirs(checkpoints.parent)) if checkpoints.is_dir() else set()
    printed = lambda text: text in log.read_text()
    if kind == "startup":  # imports, data, restore, compilation or the first steps
        delay = rng.uniform(0.5, 4.0)
        _wait_for(lambda: time.time() - t_launch >= delay, proc, "the startup kill")
    elif kind == "after_resume":  # right after the restore: compilation, first steps
        _wait_for(lambda: printed("resumed from") or printed("initial compilation"), proc, "the resume")
        time.sleep(rng.uniform(0.0, 1.0))
    elif kind == "mid_epoch":  # training steps, two epochs into this launch, after that epoch's checkpoint
        _wait_for(lambda: log.read_text().count(": loss ") >= 2, proc, "two epochs")
        _wait_for(lambda: len(set(step_dirs(checkpoints.parent)) - existing) >= 2 and not _tmp_dirs(checkpoints),
                  proc, "their checkpoints")
        time.sleep(rng.uniform(0.05, 0.4))
    elif kind == "during_save":
        _wait_for(lambda: bool(_tmp_dirs(checkpoints)), proc, "a checkpoint save")
        time.sleep(rng.uniform(0.0, 0.15))
    elif kind == "after_save":  # a new checkpoint was just committed: old-step deletion, metrics, next epoch
        _wait_for(lambda: checkpoints.is_dir() and bool(set(step_dirs(checkpoints.parent)) - existing), proc,
                  "a new checkpoint")
        time.sleep(rng.uniform(0.0, 0.1))
    else:
        raise ValueError(kind)
    assert proc.poll() is None, f"the run finished before the {kind} kill: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = _tmp_dirs(checkpoints)
    epochs = log.read_text().count(": loss ")
    return (f"{kind} at {time.time() - t_launch:.1f}s after {epochs} epoch(s) of this launch, checkpoints "
            f"{step_dirs(checkpoints.parent) if checkpoints.is_dir() else []}" + (f", left {left[0]}" if left else ""))


def write_slow_save_hook(directory: pathlib.Path, seconds: float) -> pathlib.Path:
    """A ``sitecustomize.py`` (for PYTHONPATH) that makes every Orbax CheckpointManager sleep ``seconds`` inside
    each save, after the arrays are in Orbax's temporary directory and before it is renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        "import asyncio\nimport dataclasses\n\nimport orbax.checkpoint as ocp\n\n\n"
        "class SlowFinalizeTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):\n"
        "    async def finalize(self, *args, **kwargs):\n"
        f"        await asyncio.sleep({seconds!r})\n"
        "        return await super().finalize(*args, **kwargs)\n\n\n"
        "_init = ocp.CheckpointManager.__init__\n\n\n"
        "def _slow_save_init(self, directory, *args, options=None, **kwargs):\n"
        "    options = dataclasses.replace(options or ocp.CheckpointManagerOptions(),\n"
        "                                  temporary_path_class=SlowFinalizeTemporaryPath)\n"
        "    _init(self, directory, *args, options=options, **kwargs)\n\n\n"
        "ocp.CheckpointManager.__init__ = _slow_save_init\n")
    return directory


@pytest.mark.slow
def test_sigkill_at_five_random_moments_resumes_bit_identically(tmp_path, tiny_cache, kill_teachers):
    num_epochs, spe = 6, KILL_TRAIN_IMAGES // 16
    data = write_tiny_npz(tmp_path / "data", n_train=KILL_TRAIN_IMAGES)
    overrides = {**TINY_OVERRIDES, "data.path": str(data), "data.cache_dir": str(tiny_cache),
                 "num_epochs": num_epochs, "log_every_steps": 5, "distill.method": "demkd",
                 "distill.warmup_epochs": 2, "teachers.checkpoints": kill_teachers, "checkpoint.keep_last": 2}
    config_file = write_config_file(tmp_path / "config.py", overrides)
    # The same command and environment for every launch. The save hook sleeps 0.3 s inside each checkpoint
    # save (arrays written, not yet renamed into place), so that a kill can land there.
    env = subprocess_env(tmp_path / "jax_cache")
    env["PYTHONPATH"] = os.pathsep.join((str(write_slow_save_hook(tmp_path / "save_hook", 0.3)), env["PYTHONPATH"]))
    cmd = [sys.executable, "-m", "demkd_jax.main", "--config", str(config_file)]

    reference = tmp_path / "reference"
    out = subprocess.run(cmd + ["--workdir", str(reference)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    workdir = tmp_path / "killed"
    checkpoints = workdir / "checkpoints"
    rng = random.Random(5)
    kinds = ["startup", "after_resume", "mid_epoch", "during_save", "after_save"]
    rng.shuffle(kinds)
    done = []
    for i, kind in enumerate(kinds):
        log = tmp_path / f"launch_{i}.log"
        with log.open("w") as f:
            t_launch = time.time()
            proc = subprocess.Popen(cmd + ["--workdir", str(workdir)], stdout=f, stderr=subprocess.STDOUT,
                                    cwd=tmp_path, env=env)
            done.append(_kill_at(kind, rng, proc, log, checkpoints, t_launch))
    assert any(kind.startswith("during_save") and ", left " in kind for kind in done), done
    final = subprocess.run(cmd + ["--workdir", str(workdir)], capture_output=True, text=True, timeout=600,
                           cwd=tmp_path, env=env)
    assert final.returncode == 0, (done, final.stderr[-3000:])

    # Bit-identical student parameters, BN statistics and optimizer state, from the final checkpoints.
    last = num_epochs * spe
    assert step_dirs(workdir)[-1] == step_dirs(reference)[-1] == last, done
    assert_bit_identical(restore_raw(checkpoints / str(last)), restore_raw(reference / "checkpoints" / str(last)))
    # Every epoch once in metrics.jsonl, with the same numbers; no leftovers of the killed saves; bounded disk.
    records = metrics_records(workdir)
    assert [r["epoch"] for r in records] == list(range(1, num_epochs + 1)), done
    assert without_timing(records) == without_timing(metrics_records(reference))
    assert not _tmp_dirs(checkpoints) and len(step_dirs(workdir)) <= 3
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_test_acc"] == json.loads((reference / "summary.json").read_text())["final_test_acc"]
    print("kills:", "; ".join(done))


def test_print_bad_input_messages():
    """With ``-s``: the bad-input table (case, message) for the record."""
    for case in BAD_INPUTS:
        if case.id in BAD_INPUT_MESSAGES:
            print(f"{case.id}\t{BAD_INPUT_MESSAGES[case.id]}")


# ----------------------------------------------------------------------------------------------------------
# Issue 17: verified teachers, crash-safe metrics, locked workdirs, config changes on resume, signals, and a
# table of hostile CLI inputs


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory) -> pathlib.Path:
    return pathlib.Path(save_random_teacher(tmp_path_factory.mktemp("verified") / "teacher", "resnet8", seed=0))


def _nan_in_teacher(d):
    rewrite_teacher_value(d, float("nan"))


def _truncate_teacher_index(d):
    f = d / ckpt_lib.TEACHER_VARIABLES / "_METADATA"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_in_teacher(d):
    f = max((p for p in (d / ckpt_lib.TEACHER_VARIABLES).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    b = bytearray(f.read_bytes())
    b[len(b) // 2:len(b) // 2 + 16] = bytes(range(16))
    f.write_bytes(bytes(b))


def _teacher_without_checksum(d):
    meta = json.loads((d / ckpt_lib.TEACHER_META).read_text())
    del meta["checksum"]
    ckpt_lib.write_json_atomic(d / ckpt_lib.TEACHER_META, meta)


TEACHER_CORRUPTIONS = {
    "finite_value_changed": (lambda d: rewrite_teacher_value(d, 0.5), "is corrupted: its arrays read back with checksum"),
    "nan_leaf": (_nan_in_teacher, "is corrupted: its arrays read back with checksum"),
    "garbage_bytes": (_garbage_in_teacher, "is corrupted"),
    "truncated_array_index": (_truncate_teacher_index, "is corrupted: its variables/ index lists"),
    "no_checksum_recorded": (_teacher_without_checksum, "cannot be verified: its teacher.json has no checksum"),
}


def test_saved_teacher_records_a_checksum_and_loads(saved_teacher):
    meta = ckpt_lib.read_teacher_meta(saved_teacher)
    assert isinstance(meta["checksum"], int)
    variables, _ = ckpt_lib.load_teacher(saved_teacher, model_name="resnet8", num_classes=TINY_CLASSES)
    assert ckpt_lib.tree_checksum(variables)[0] == meta["checksum"]


@pytest.mark.parametrize("kind", list(TEACHER_CORRUPTIONS))
def test_damaged_teacher_is_refused_in_one_line_naming_it(kind, saved_teacher, tmp_path):
    corrupt, reason = TEACHER_CORRUPTIONS[kind]
    d = tmp_path / "teacher"
    shutil.copytree(saved_teacher, d)
    corrupt(d)
    with pytest.raises(ckpt_lib.CheckpointError) as err:
        ckpt_lib.load_teacher(d)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"teacher checkpoint {str(d)!r}") and reason in msg, msg


def test_converted_teacher_is_saved_with_a_checksum(tmp_path):
    """convert writes through save_teacher with numpy leaves: the same checksum as the device arrays."""
    model = models.create_model("resnet8", TINY_CLASSES, width=0.25)
    variables = jax.tree_util.tree_map(np.asarray, jax.jit(lambda k: models.init_variables(model, k))(
        jax.random.PRNGKey(3)))
    ckpt_lib.save_teacher(tmp_path / "t", variables, model_name="resnet8", num_classes=TINY_CLASSES, width=0.25)
    assert ckpt_lib.read_teacher_meta(tmp_path / "t")["checksum"] == ckpt_lib.tree_checksum(variables)[0]
    bad = jax.tree_util.tree_map(np.array, variables)
    jax.tree_util.tree_leaves(bad)[0].reshape(-1)[0] = np.inf
    with pytest.raises(ckpt_lib.CheckpointError, match="non-finite"):
        ckpt_lib.save_teacher(tmp_path / "t2", bad, model_name="resnet8", num_classes=TINY_CLASSES, width=0.25)


def test_cut_last_metrics_line_is_repaired_from_the_checkpoint(base_run, tmp_path, capsys):
    config, base, summary, _, records = base_run
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    text = (workdir / "metrics.jsonl").read_text()
    cut = text[: len(text) - len(text.splitlines()[-1]) // 2 - 1]  # a crash in the middle of the last record
    (workdir / "metrics.jsonl").write_text(cut)
    capsys.readouterr()
    resumed = train.train_and_evaluate(config(), str(workdir))
    assert "had lost the records of epoch(s) 4; restored them from the checkpoint" in capsys.readouterr().out
    assert metrics_records(workdir) == records
    assert resumed["final_test_acc"] == summary["final_test_acc"]
    assert json.loads((workdir / "summary.json").read_text())["final_test_acc"] == summary["final_test_acc"]


def test_metrics_log_keeps_records_and_drops_a_cut_line(tmp_path):
    from demkd_jax.workdir import MetricsLog

    log = MetricsLog(tmp_path)
    for e in (1, 2, 3):
        log.write({"epoch": e, "step": 6 * e, "test_acc": float(e)})
    with log.path.open("a") as f:
        f.write('{"epoch": 4, "step": 24, "te')
    lines = []
    kept = log.resume(18, saved=[{"epoch": 1, "step": 6, "test_acc": 9.0}], log=lines.append)
    assert [r["epoch"] for r in kept] == [1, 2, 3] and kept[0]["test_acc"] == 1.0 and lines == []
    assert metrics_records(tmp_path) == kept
    (tmp_path / "metrics.jsonl").write_text("")
    kept = log.resume(12, saved=[{"epoch": 1, "step": 6}, {"epoch": 2, "step": 12}, {"epoch": 3, "step": 18}])
    assert [r["epoch"] for r in kept] == [1, 2]


def test_resume_with_another_seed_is_refused_naming_it(base_run, tmp_path, capsys):
    config, base, _, final, records = base_run
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    before = _tree_snapshot(workdir)
    with pytest.raises(config_lib.ConfigError) as err:
        train.train_and_evaluate(config(**{"seed": 1, "distill.temperature": 2.0}), str(workdir))
    msg = str(err.value)
    assert "\n" not in msg and f"workdir {str(workdir)!r} holds a run with another config" in msg
    assert "distill.temperature: 4.0 -> 2.0; seed: 0 -> 1" in msg and "allow_config_change=True" in msg
    assert _tree_snapshot(workdir) == before
    # Result-neutral fields may change; the override resumes and keeps the old config.json aside.
    train.train_and_evaluate(config(**{"log_every_steps": 3, "progress_bar": False}), str(workdir))
    assert not list(workdir.glob("config.step*.json"))
    capsys.readouterr()
    train.train_and_evaluate(config(**{"seed": 1, "checkpoint.allow_config_change": True}), str(workdir))
    assert "with a changed config (seed: 0 -> 1)" in capsys.readouterr().out
    assert json.loads((workdir / "config.json").read_text())["seed"] == 1
    assert json.loads((workdir / f"config.step{4 * SPE}.json").read_text())["seed"] == 0


def test_workdir_in_use_is_refused_and_a_stale_lock_taken_over(make_config, tmp_path):
    from demkd_jax.workdir import LOCK_NAME, WorkdirLock

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = WorkdirLock(workdir)
    holder.acquire()
    try:
        with pytest.raises(config_lib.ConfigError) as err:
            train.train_and_evaluate(make_config(), str(workdir))
        msg = str(err.value)
        assert "\n" not in msg and f"workdir {str(workdir)!r} is in use by another run (pid {os.getpid()} on " in msg
        assert os.listdir(workdir) == [LOCK_NAME]
    finally:
        holder.release()
    assert os.listdir(workdir) == []
    # What a killed run leaves: the file, unlocked (the kernel drops the lock of a dead process).
    (workdir / LOCK_NAME).write_text('{"pid": 999999999, "host": "gone", "started": "yesterday"}')
    lines = []
    lock = WorkdirLock(workdir)
    lock.acquire(lines.append)
    assert len(lines) == 1 and "took over the stale lock" in lines[0] and "pid 999999999 on gone" in lines[0]
    assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_signal_inside_a_critical_write_waits_for_it():
    from demkd_jax import interrupts

    with interrupts.stop_on_signals():
        done = []
        with pytest.raises(interrupts.Interrupted) as err:
            with interrupts.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("written")
            done.append("after")
        assert done == ["written"] and err.value.exit_status == 143
        with pytest.raises(interrupts.Interrupted) as err:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert err.value.exit_status == 130
    assert signal.getsignal(signal.SIGTERM) is not interrupts._handler


def test_a_signal_during_a_restore_is_not_taken_for_corruption(tmp_path, monkeypatch):
    from demkd_jax import interrupts

    directory = tmp_path / "checkpoints"
    _saved_checkpointer(directory, steps=(1, 2))

    def interrupted_restore(self, *args, **kwargs):
        raise interrupts.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", interrupted_restore)
    with pytest.raises(interrupts.Interrupted):
        ckpt_lib.TrainCheckpointer(directory).restore_latest(jax.eval_shape(lambda: _tiny_state(0)))
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def _tree_snapshot(root: pathlib.Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with a file's content (None: a directory); {} if ``root`` does not exist."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


SIGNAL_TRAIN_IMAGES = 480  # 30 steps per epoch: a signal lands among the training steps


def test_sigint_and_sigterm_stop_cleanly_and_the_rerun_resumes(tmp_path, tiny_cache):
    num_epochs, spe = 3, SIGNAL_TRAIN_IMAGES // 16
    data = write_tiny_npz(tmp_path / "data", n_train=SIGNAL_TRAIN_IMAGES)
    overrides = {**TINY_OVERRIDES, "data.path": str(data), "data.cache_dir": str(tiny_cache),
                 "num_epochs": num_epochs, "log_every_steps": 5}
    config_file = write_config_file(tmp_path / "config.py", overrides)
    env = subprocess_env(tmp_path / "jax_cache")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "demkd_jax.main", "--config", str(config_file), "--workdir", str(workdir)]

    def launch_and_signal(sig, ready: Callable[[str], bool], i: int) -> tuple[int, str]:
        log = tmp_path / f"launch_{i}.log"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
            _wait_for(lambda: (workdir / "checkpoints").is_dir() and ready(log.read_text()), proc, f"launch {i}")
            assert proc.poll() is None, log.read_text()[-2000:]
            proc.send_signal(sig)
            proc.wait(timeout=120)
        return proc.returncode, log.read_text()

    # SIGINT once epoch 1 is checkpointed, during epoch 2's steps.
    rc, out = launch_and_signal(signal.SIGINT, lambda log: spe in step_dirs(workdir) and not _tmp_dirs(
        workdir / "checkpoints"), 0)
    assert rc == 130, out[-3000:]
    said = [line for line in out.splitlines() if line.startswith("interrupted:")]
    assert said == [f"interrupted: interrupted by SIGINT; rerun the same command to resume from the last checkpoint "
                    f"(step {spe} in {workdir / 'checkpoints'})"], out[-3000:]
    assert "Traceback" not in out and not (workdir / ".lock").exists()
    # The rerun resumes; SIGTERM right after the resume.
    rc, out = launch_and_signal(signal.SIGTERM, lambda log: "resumed from" in log, 1)
    assert f"resumed from {workdir / 'checkpoints'} at step {spe}" in out
    assert rc == 143 and "interrupted: interrupted by SIGTERM;" in out and "Traceback" not in out, out[-3000:]
    records = metrics_records(workdir)
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1)) and step_dirs(workdir)[-1] < num_epochs * spe
    assert not (workdir / ".lock").exists() and not _tmp_dirs(workdir / "checkpoints")


@dataclasses.dataclass(frozen=True)
class HostileCli:
    id: str
    # (tmp, cleanups) -> (argv after the interpreter, the directory that must stay unchanged)
    make: Callable[[pathlib.Path, list], tuple[list[str], pathlib.Path]]
    expect: str  # the bad value, named in the one error line


def _main(config: pathlib.Path | str, workdir: pathlib.Path | str, *flags: str) -> list[str]:
    return ["-m", "demkd_jax.main", "--config", str(config), f"--workdir={workdir}", *flags]


def _tiny_config_file(tmp: pathlib.Path, **extra) -> pathlib.Path:
    overrides = {**TINY_OVERRIDES, "data.path": str(tmp / "data"), "data.cache_dir": str(tmp / "cache"), **extra}
    return write_config_file(tmp / "config.py", overrides)


def _config_file_case(name: str, content: bytes | None):
    def make(tmp, cleanups):
        path = tmp / name
        if content is not None:
            path.write_bytes(content)
        return _main(path, tmp / "run"), tmp / "run"
    return make


def _empty_workdir(tmp, cleanups):
    return _main(_tiny_config_file(tmp), ""), tmp  # the current directory (tmp) must stay as it is


def _locked_workdir(tmp, cleanups):
    from demkd_jax.workdir import WorkdirLock

    workdir = tmp / "run"
    workdir.mkdir()
    holder = WorkdirLock(workdir)  # held by this (the test) process, another than the CLI's
    holder.acquire()
    cleanups.append(holder.release)
    return _main(_tiny_config_file(tmp), workdir), workdir


def _resume_with_another_seed(tmp, cleanups):
    workdir = tmp / "run"
    (workdir / "checkpoints" / "6").mkdir(parents=True)  # a checkpoint is there: this would be a resume
    config = config_lib.base_config()
    apply_overrides(config, {**TINY_OVERRIDES, "data.path": str(tmp / "data"), "data.cache_dir": str(tmp / "cache")})
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return _main(_tiny_config_file(tmp), workdir, "--config.seed=7"), workdir


def _teacher_path_file(tmp, cleanups):
    (tmp / "t.pth").write_bytes(b"torch")
    return _main(_tiny_config_file(tmp, **{"distill.method": "kd", "teachers.checkpoints": (str(tmp / "t.pth"),)}),
                 tmp / "run"), tmp / "run"


def _npz_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, image=np.zeros((2, 32, 32, 3), np.uint8))
    return buffer.getvalue()


NPZ_BYTES = _npz_bytes()

HOSTILE_CLI = [
    HostileCli("empty_workdir", _empty_workdir, "workdir '' is empty"),
    HostileCli("config_missing", _config_file_case("nope.py", None), "nope.py' does not exist"),
    HostileCli("config_is_a_text_file", _config_file_case("notes.txt", b"hello world\n"),
               "notes.txt' is not valid Python"),
    HostileCli("config_is_an_npz", _config_file_case("data.npz", NPZ_BYTES),
               "data.npz' is not a Python config file (it holds binary data)"),
    HostileCli("config_without_get_config", _config_file_case("c.py", b"x = 1\n"), "c.py' defines no get_config()"),
    HostileCli("config_is_a_directory", lambda tmp, _: (_main(tmp, tmp / "run"), tmp / "run"), "' is not a file"),
    HostileCli("workdir_in_use", _locked_workdir, "is in use by another run (pid "),
    HostileCli("resume_with_another_seed", _resume_with_another_seed, "another config (seed: 0 -> 7)"),
    HostileCli("teacher_path_is_a_file", _teacher_path_file, "t.pth' is a file, expected a teacher checkpoint"),
    HostileCli("negative_epochs", lambda tmp, _: (_main(_tiny_config_file(tmp), tmp / "run", "--config.num_epochs=-1"),
                                               tmp / "run"), "config.num_epochs must be a positive integer, got -1"),
    HostileCli("reproduce_unknown_student",
               lambda tmp, _: (["-m", "demkd_jax.reproduce", "--pair", "resnet14-nope", "--workdir", str(tmp / "r")],
                            tmp / "r"), "unknown model name 'nope'"),
    HostileCli("reproduce_negative_epochs",
               lambda tmp, _: (["-m", "demkd_jax.reproduce", "--pair", "resnet14-resnet8", "--epochs", "-1",
                             "--workdir", str(tmp / "r")], tmp / "r"), "num_epochs must be a positive integer, got -1"),
]


@pytest.mark.parametrize("case", HOSTILE_CLI, ids=[c.id for c in HOSTILE_CLI])
def test_hostile_cli_input_exits_2_with_one_line_and_changes_nothing(case, tmp_path):
    write_tiny_npz(tmp_path / "data")
    cleanups: list[Callable[[], None]] = []
    try:
        argv, watched = case.make(tmp_path, cleanups)
        before = _tree_snapshot(watched)
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env=subprocess_env())
        after = _tree_snapshot(watched)
    finally:
        for cleanup in cleanups:
            cleanup()
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and case.expect in lines[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert after == before

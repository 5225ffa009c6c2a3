"""Checkpoints (Orbax).

Teacher checkpoints: one directory per teacher::

    <dir>/teacher.json    {"format": "demkd_jax.teacher/1", "model": "vgg13", "num_classes": 100, "width": 1.0, ...}
    <dir>/variables/      Orbax StandardCheckpointer tree {"params", "batch_stats"}

written by the teacher trainer and by ``python -m demkd_jax.convert`` alike, and restored by
:func:`load_teacher`, which checks the architecture, class count and every parameter shape against the
model the distillation config asks for, naming any mismatch.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from demkd_jax import models

TEACHER_FORMAT = "demkd_jax.teacher/1"
TEACHER_META = "teacher.json"
TEACHER_VARIABLES = "variables"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, or does not match what the config expects."""


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Writes JSON via a temporary file and an atomic rename, so a crash never leaves half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _tree_paths(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def compare_trees(expected: Any, actual: Any, what: str) -> None:
    """Raises CheckpointError listing missing, unexpected and wrongly shaped leaves (by path)."""
    exp, act = _tree_paths(expected), _tree_paths(actual)
    missing = sorted(set(exp) - set(act))
    unexpected = sorted(set(act) - set(exp))
    shapes = sorted(
        f"{k}: expected {tuple(exp[k].shape)}, found {tuple(act[k].shape)}"
        for k in set(exp) & set(act)
        if tuple(exp[k].shape) != tuple(act[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} ({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})"
        )
    if shapes:
        problems.append(f"wrong shapes: {'; '.join(shapes[:5])}{'; ...' if len(shapes) > 5 else ''}")
    if problems:
        raise CheckpointError(f"{what} does not match: " + " | ".join(problems))


def save_teacher(
    directory: str | os.PathLike,
    variables: Mapping[str, Any],
    *,
    model_name: str,
    num_classes: int,
    width: float = 1.0,
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Saves one teacher's ``{"params", "batch_stats"}`` with its architecture metadata."""
    directory = pathlib.Path(directory).absolute()
    model = models.create_model(model_name, num_classes, width=width)
    abstract = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    compare_trees(abstract, variables, f"teacher variables for {model_name} ({num_classes} classes)")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / TEACHER_VARIABLES, jax.device_get(variables), force=True)
        ckptr.wait_until_finished()
    meta = {
        "format": TEACHER_FORMAT,
        "model": model_name,
        "num_classes": int(num_classes),
        "width": float(width),
        "num_params": models.count_params(variables["params"]),
        **(dict(metadata) if metadata else {}),
    }
    if jax.process_index() == 0:  # multi-host: every process calls Orbax above, one writes the metadata
        write_json_atomic(directory / TEACHER_META, meta)
    return directory


def read_teacher_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = pathlib.Path(directory)
    meta_path = directory / TEACHER_META
    if not directory.is_dir():
        raise CheckpointError(f"teacher checkpoint directory {str(directory)!r} does not exist")
    if not meta_path.is_file():
        raise CheckpointError(
            f"{str(directory)!r} is not a demkd_jax teacher checkpoint (no {TEACHER_META}); write one with the "
            "teacher trainer (method='ce') or `python -m demkd_jax.convert --torch FILE.pth --model NAME --out DIR`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupted teacher metadata {str(meta_path)!r}: {e}") from None
    if meta.get("format") != TEACHER_FORMAT:
        raise CheckpointError(f"{str(meta_path)!r} has format {meta.get('format')!r}, expected {TEACHER_FORMAT!r}")
    return meta


def load_teacher(
    directory: str | os.PathLike,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    width: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores a teacher, checking it is the architecture and class count the caller expects.

    Returns ``(variables, metadata)`` with numpy leaves.
    """
    meta = read_teacher_meta(directory)
    where = f"teacher checkpoint {str(directory)!r}"
    if model_name is not None and meta["model"] != model_name:
        raise CheckpointError(f"{where} holds a {meta['model']!r}, but the config expects {model_name!r}")
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise CheckpointError(
            f"{where} has {meta['num_classes']} classes, but the data has {num_classes}"
        )
    if width is not None and float(meta.get("width", 1.0)) != float(width):
        raise CheckpointError(f"{where} has width {meta.get('width')}, but the config expects {width}")
    model = models.create_model(meta["model"], meta["num_classes"], width=meta.get("width", 1.0))
    abstract = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))
    path = pathlib.Path(directory).absolute() / TEACHER_VARIABLES
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(path)
            stored_tree = getattr(stored, "item_metadata", stored)
            stored_tree = getattr(stored_tree, "tree", stored_tree)
            compare_trees(abstract, stored_tree, where)
            restored = ckptr.restore(path, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # Orbax/tensorstore errors: report in one line
        raise CheckpointError(f"cannot restore {where}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return jax.tree_util.tree_map(np.asarray, restored), meta


class TrainCheckpointer:
    """Student training state in ``<workdir>/checkpoints``: keep the last ``keep_last`` plus the best.

    Saves are synchronous (the state is on the host once written), so a run that is killed never leaves a
    checkpoint that looks complete but is not; Orbax writes into a temporary directory and renames it.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, keep_best: bool = True):
        from orbax.checkpoint import checkpoint_managers as policies

        self.directory = pathlib.Path(directory).absolute()
        keep = [policies.LatestN(n=keep_last)]
        if keep_best:
            keep.append(policies.BestN(get_metric_fn=lambda m: m["test_acc"], reverse=False, n=1,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=False,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, *, test_acc: float) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), metrics={"test_acc": float(test_acc)},
                          force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> Any:
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def close(self) -> None:
        self.manager.close()

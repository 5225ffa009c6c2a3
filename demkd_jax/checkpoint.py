"""Checkpoints (Orbax): teacher checkpoints (``teacher.json`` + ``variables/``) and the student's training
checkpoints (:class:`TrainCheckpointer`), both verified by a checksum of every bit when read back. Format,
verification and corruption handling: docs/checkpoints.md.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from demkd_jax import interrupts, models
from demkd_jax.workdir import write_text_atomic

TEACHER_FORMAT = "demkd_jax.teacher/1"
TEACHER_META = "teacher.json"
TEACHER_VARIABLES = "variables"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, or does not match what the config expects."""


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Writes JSON via a temporary file and an atomic rename, so a crash never leaves half a file."""
    write_text_atomic(pathlib.Path(path), json.dumps(obj, indent=2, sort_keys=True))


def _key_name(k: Any) -> str:
    """One key of a tree path, the same for a dict key, a dataclass field and a sequence index."""
    return str(next((getattr(k, attr) for attr in ("key", "name", "idx") if hasattr(k, attr)), k))


def tree_paths(tree: Any) -> dict[str, Any]:
    """``{"params/stem/conv/kernel": leaf, ...}``: every leaf by its path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _first5(items: list[str], sep: str) -> str:
    return sep.join(items[:5]) + (f"{sep}..." if len(items) > 5 else "")


@functools.lru_cache(maxsize=None)
def abstract_variables(model_name: str, num_classes: int, width: float = 1.0) -> dict[str, Any]:
    """The ``{"params", "batch_stats"}`` shapes of a zoo model (``jax.eval_shape``; shared, do not modify)."""
    model = models.create_model(model_name, num_classes, width=width)
    return jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))


def compare_trees(expected: Any, actual: Any, what: str) -> None:
    """Raises CheckpointError listing missing, unexpected and wrongly shaped leaves (by path)."""
    exp, act = tree_paths(expected), tree_paths(actual)
    missing, unexpected = sorted(set(exp) - set(act)), sorted(set(act) - set(exp))
    shapes = sorted(f"{k}: expected {tuple(exp[k].shape)}, found {tuple(act[k].shape)}"
                    for k in set(exp) & set(act) if tuple(exp[k].shape) != tuple(act[k].shape))
    problems = [f"{label} {len(keys)} ({_first5(keys, ', ')})"
                for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if shapes:
        problems.append(f"wrong shapes: {_first5(shapes, '; ')}")
    if problems:
        raise CheckpointError(f"{what} does not match: " + " | ".join(problems))


def save_teacher(directory: str | os.PathLike, variables: Mapping[str, Any], *, model_name: str, num_classes: int,
                 width: float = 1.0, metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Saves one teacher's ``{"params", "batch_stats"}`` with its architecture metadata."""
    directory = pathlib.Path(directory).absolute()
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    compare_trees(abstract_variables(model_name, num_classes, float(width)), variables,
                  f"teacher variables for {model_name} ({num_classes} classes)")
    directory.mkdir(parents=True, exist_ok=True)
    # teacher.json marks a complete teacher: drop an old one before its variables are rewritten.
    (directory / TEACHER_META).unlink(missing_ok=True)
    variables = jax.device_get(variables)
    checksum, finite = tree_checksum(variables)
    if not finite:
        raise CheckpointError(f"refusing to save teacher {str(directory)!r}: its variables hold non-finite values")
    with interrupts.critical(), ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / TEACHER_VARIABLES, variables, force=True)
        ckptr.wait_until_finished()
    meta = {"format": TEACHER_FORMAT, "model": model_name, "num_classes": int(num_classes), "width": float(width),
            "num_params": models.count_params(variables["params"]), "checksum": checksum, **(metadata or {})}
    if jax.process_index() == 0:  # multi-host: every process calls Orbax above, one writes the metadata
        with interrupts.critical():
            write_json_atomic(directory / TEACHER_META, meta)
    return directory


def read_teacher_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = pathlib.Path(directory)
    meta_path = directory / TEACHER_META
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"teacher checkpoint {str(directory)!r} is a file, expected a teacher checkpoint "
                              f"directory (holding {TEACHER_META} and {TEACHER_VARIABLES}/)")
    if not directory.is_dir():
        raise CheckpointError(f"teacher checkpoint directory {str(directory)!r} does not exist")
    if not meta_path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a demkd_jax teacher checkpoint (no {TEACHER_META}); write "
                              "one with the teacher trainer (method='ce') or `python -m demkd_jax.convert --torch "
                              "FILE.pth --model NAME --out DIR`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupted teacher metadata {str(meta_path)!r}: {e}") from None
    if meta.get("format") != TEACHER_FORMAT:
        raise CheckpointError(f"{str(meta_path)!r} has format {meta.get('format')!r}, expected {TEACHER_FORMAT!r}")
    return meta


def load_teacher(directory: str | os.PathLike, *, model_name: str | None = None,
                 num_classes: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(variables, metadata)`` (numpy leaves) of a verified teacher of the architecture the caller expects."""
    meta = check_teacher_dirs([directory], model_name=model_name, num_classes=num_classes)[0]
    where = f"teacher checkpoint {str(directory)!r}"
    abstract = abstract_variables(meta["model"], meta["num_classes"], float(meta.get("width", 1.0)))
    expected_checksum = meta.get("checksum")
    if not isinstance(expected_checksum, int):
        raise CheckpointError(f"{where} cannot be verified: its {TEACHER_META} has no checksum (written before "
                              "checksums were recorded); convert or train it again")
    path = pathlib.Path(directory).absolute() / TEACHER_VARIABLES
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(path)
            stored_tree = getattr(stored, "item_metadata", stored)
            stored_tree = getattr(stored_tree, "tree", stored_tree)
            _compare_stored_teacher_tree(abstract, stored_tree, where)
            restored = ckptr.restore(path, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # Orbax/tensorstore errors: report in one line
        raise CheckpointError(f"{where} is corrupted: cannot read its arrays ({_one_line(e)}); convert or train it "
                              "again") from None
    checksum, finite = tree_checksum(restored)
    if checksum != expected_checksum:
        raise CheckpointError(f"{where} is corrupted: its arrays read back with checksum {checksum}, saved as "
                              f"{expected_checksum}; convert or train it again")
    if not finite:
        raise CheckpointError(f"{where} is corrupted: its arrays hold non-finite values; convert or train it again")
    return jax.tree_util.tree_map(np.asarray, restored), meta


def _compare_stored_teacher_tree(abstract: Any, stored_tree: Any, where: str) -> None:
    """The stored tree against the architecture ``teacher.json`` names. Arrays missing while every stored one
    fits is a damaged index (``teacher.json`` is written last, after all arrays), not another architecture."""
    try:
        compare_trees(abstract, stored_tree, where)
    except CheckpointError:
        expected, stored = tree_paths(abstract), tree_paths(stored_tree)
        fits = set(stored) <= set(expected) and all(
            tuple(expected[k].shape) == tuple(v.shape) for k, v in stored.items())
        if not fits:
            raise
        raise CheckpointError(f"{where} is corrupted: its {TEACHER_VARIABLES}/ index lists {len(stored)} of the "
                              f"{len(expected)} arrays its {TEACHER_META} implies (truncated or damaged files); "
                              "convert or train it again") from None


def check_teacher_dirs(dirs: list[str | os.PathLike] | tuple[str | os.PathLike, ...], *, model_name: str | None = None,
                       num_classes: int | None = None) -> list[dict[str, Any]]:
    """Checks teacher checkpoints from their ``teacher.json`` alone (no arrays read, nothing compiled): readable,
    of ``model_name`` with ``num_classes`` classes, one architecture for all. Returns each one's metadata."""
    metas = [read_teacher_meta(d) for d in dirs]
    for d, meta in zip(dirs, metas):
        where = f"teacher checkpoint {str(d)!r}"
        if meta.get("model") not in models.MODEL_NAMES:
            raise CheckpointError(f"{where} names an unknown model {meta.get('model')!r} in {TEACHER_META}; expected "
                                  f"one of {', '.join(models.MODEL_NAMES)}")
        if model_name is not None and meta["model"] != model_name:
            raise CheckpointError(f"{where} holds a {meta['model']!r}, but the config expects {model_name!r} "
                                  "(config.teachers.model)")
        if not isinstance(meta.get("num_classes"), int) or meta["num_classes"] < 1:
            raise CheckpointError(f"{where} has an invalid class count {meta.get('num_classes')!r} in {TEACHER_META}")
        if num_classes is not None and meta["num_classes"] != num_classes:
            raise CheckpointError(f"{where} has {meta['num_classes']} classes, but the data has {num_classes}")
        if not (pathlib.Path(d) / TEACHER_VARIABLES / "_METADATA").is_file():
            raise CheckpointError(f"{where} is incomplete: {TEACHER_META} is there but its {TEACHER_VARIABLES}/ "
                                  "(the Orbax arrays) is missing or partial; convert or train it again")
    require_one_architecture(dirs, metas)
    return metas


def require_one_architecture(dirs, metas: list[dict[str, Any]]) -> None:
    """Teachers are stacked on one axis: raises :class:`CheckpointError` naming each if their models differ."""
    archs = {(m["model"], float(m.get("width", 1.0))) for m in metas}
    if len(archs) > 1:
        found = ", ".join(f"{os.path.basename(os.path.normpath(str(d)))!r}: {m['model']} (width {m.get('width', 1.0)})"
                          for d, m in zip(dirs, metas))
        raise CheckpointError(f"mixed teacher architectures ({found}); the teachers are stacked on one axis and must "
                              "share one architecture")


# ---------------------------------------------------------------------- checksums and training checkpoints
def _leaf_words(x: jax.Array) -> jax.Array:
    """The bits of an array as a flat uint32 vector (every dtype; 64-bit values give two words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksum_and_finite(tree: Any) -> tuple[jax.Array, jax.Array]:
    total = jnp.zeros((), jnp.uint32)
    finite = jnp.ones((), jnp.bool_)
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
        words = _leaf_words(leaf)
        # Odd position weights: changing any single word changes the sum (mod 2^32) for certain; the leaf index
        # in the weight catches swapped leaves. Integer sums are exact, so the value does not depend on the
        # reduction order, the device or the sharding.
        weights = (jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761)
                   + jnp.uint32(2 * i + 1)) | jnp.uint32(1)
        total = total + jnp.sum(words * weights, dtype=jnp.uint32)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            finite = finite & jnp.all(jnp.isfinite(leaf))
    return total, finite


def tree_checksum(tree: Any) -> tuple[int, bool]:
    """``(checksum, all_finite)`` of a pytree of arrays: a uint32 over every bit of every leaf, and whether all
    floating-point values are finite. Computed on the device (works on sharded arrays)."""
    total, finite = jax.device_get(_checksum_and_finite(tree))
    return int(total), bool(finite)


class _CorruptCheckpoint(Exception):
    """A training checkpoint that cannot be read back exactly (the message says what is wrong)."""


def _one_line(e: BaseException) -> str:
    """The innermost cause of an Orbax/tensorstore error (the informative one), on one short line."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class TrainCheckpointer:
    """Student training state in ``<workdir>/checkpoints/<step>/``: the last ``keep_last`` plus the best, each
    saved with its test accuracy and a checksum; corrupted ones are set aside on restore (docs/checkpoints.md)."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, keep_best: bool = True,
                 delete_corrupt: bool = False, restart_if_all_corrupt: bool = False, log=print):
        self.directory = pathlib.Path(directory).absolute()
        self.keep_last = int(keep_last)
        self.keep_best = bool(keep_best)
        self.delete_corrupt = bool(delete_corrupt)
        self.restart_if_all_corrupt = bool(restart_if_all_corrupt)
        self.log = log
        self._manager = None  # created after restore_latest's scan: Orbax reads every step's metrics on creation

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            from orbax.checkpoint import checkpoint_managers as policies

            keep = [policies.LatestN(n=self.keep_last)]
            if self.keep_best:
                keep.append(policies.BestN(get_metric_fn=_test_acc, reverse=False, n=1,
                                           keep_checkpoints_without_metrics=False))
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(keep),
                # Without best_fn Orbax does not write the metrics, and after a restart BestN would see no test
                # accuracy and delete the best checkpoint. best_fn only turns the writing on here.
                best_fn=_test_acc,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,  # what a killed save left behind
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dirs(self) -> list[int]:
        """Steps with a directory ``<step>/`` (complete or not; Orbax's temporary directories excluded), sorted."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def save(self, step: int, state: Any, *, test_acc: float, records: list[dict] | None = None) -> None:
        """Saves ``state`` as ``step``; ``records`` (the run's metrics.jsonl records so far) are kept with it, so
        that a damaged metrics.jsonl can be repaired on resume (:meth:`saved_records`)."""
        checksum, finite = tree_checksum(state)
        if not finite:  # the train step never lets a non-finite value into the state; refuse to persist one
            raise CheckpointError(f"refusing to save step {step}: the state holds non-finite values")
        metrics = {"test_acc": float(test_acc), "checksum": checksum}
        if records is not None:
            metrics["records"] = list(records)
        with interrupts.critical():
            self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
            self.manager.wait_until_finished()

    def saved_records(self, step: int) -> list[dict]:
        """The metrics.jsonl records saved with checkpoint ``step`` (none for a checkpoint saved without)."""
        try:
            metrics = self._read_metrics(step)
        except _CorruptCheckpoint:
            return []
        records = (metrics or {}).get("records", [])
        return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores ``step`` and verifies it; raises :class:`CheckpointError` if it does not read back exactly."""
        try:
            return self._restore_verified(step, abstract_state)
        except _CorruptCheckpoint as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupted: {e}") from None

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """``(step, state)`` of the newest checkpoint that reads back exactly (newer corrupted ones are reported
        and set aside), or None for a fresh start. Raises :class:`CheckpointError` if none is good (unless
        ``restart_if_all_corrupt``) or one was written by another configuration."""
        bad: list[tuple[int, str]] = []
        for step in reversed(self.step_dirs()):
            try:
                state = self._restore_verified(step, abstract_state)
                break
            except _CorruptCheckpoint as e:
                bad.append((step, str(e)))
        else:
            if bad:
                self._all_corrupt(bad)
            return None
        for s, reason in bad:
            self.log(f"checkpoint step {s} in {self.directory} is corrupted ({reason}); {self._set_aside(s)}, "
                     f"resuming from step {step}")
        # Older checkpoints are only read fully if they are ever needed, but their metrics must parse, or Orbax
        # cannot open the directory.
        for s in [s for s in self.step_dirs() if s < step]:
            try:
                self._read_metrics(s)
            except _CorruptCheckpoint as e:
                self.log(f"older checkpoint step {s} in {self.directory} is corrupted ({e}); {self._set_aside(s)}")
        return step, state

    def _all_corrupt(self, bad: list[tuple[int, str]]) -> None:
        """Refuses to start over (raises), or with ``restart_if_all_corrupt`` sets every checkpoint aside."""
        what = "; ".join(f"step {s}: {r}" for s, r in bad)
        if not self.restart_if_all_corrupt:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} ({what}); refusing to start over silently: move "
                "that directory away to start from scratch, or set config.checkpoint.restart_if_all_corrupt=True")
        for s, _ in bad:
            self._set_aside(s)
        self.log(f"every checkpoint in {self.directory} is corrupted ({what}); "
                 f"{'deleted' if self.delete_corrupt else 'moved aside'} and starting from scratch "
                 "(config.checkpoint.restart_if_all_corrupt)")

    def _read_metrics(self, step: int) -> dict | None:
        """The metrics written with ``step`` (test accuracy, checksum, epoch records), None if the file is missing."""
        path = self.directory / str(step) / "metrics" / "metrics"
        if not path.exists():
            return None
        try:
            metrics = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _CorruptCheckpoint(f"unreadable metrics file ({_one_line(e)})") from None
        if not isinstance(metrics, dict):
            raise _CorruptCheckpoint("malformed metrics file")
        return metrics

    def _restore_verified(self, step: int, abstract_state: Any) -> Any:
        item = self.directory / str(step) / "default"
        if not item.is_dir():
            raise _CorruptCheckpoint("its state directory 'default' is missing")
        metrics = self._read_metrics(step)
        expected = None if metrics is None else metrics.get("checksum")
        if not isinstance(expected, int):  # a checkpoint that cannot be verified is treated as corrupted
            raise _CorruptCheckpoint("it cannot be verified: its metrics file (holding the checksum) is "
                                     f"{'missing' if metrics is None else 'without a checksum'}")
        with ocp.StandardCheckpointer() as ckptr:
            try:
                stored = ocp.StandardCheckpointHandler().metadata(item)  # the tree alone, no step metadata
                stored_tree = getattr(stored, "tree", stored)
            except Exception as e:  # Orbax: FileNotFoundError, JSONDecodeError, ValueError, ...
                raise _CorruptCheckpoint(f"unreadable tree metadata ({_one_line(e)})") from None
            try:
                compare_trees(abstract_state, stored_tree, f"checkpoint step {step} in {self.directory}")
            except CheckpointError as e:
                raise CheckpointError(f"{e}; it was written by a run with another configuration (model, method, "
                                      "teachers or seeds): use a new --workdir") from None
            except Exception as e:  # the metadata parsed, but not into a tree: corrupted
                raise _CorruptCheckpoint(f"malformed tree metadata ({_one_line(e)})") from None
            try:
                state = ckptr.restore(item, abstract_state)
            except Exception as e:  # Orbax/tensorstore read errors
                raise _CorruptCheckpoint(f"cannot read its arrays ({_one_line(e)})") from None
        try:
            compare_trees(abstract_state, state, "restored state")
        except CheckpointError as e:
            raise _CorruptCheckpoint(str(e)) from None
        checksum, finite = tree_checksum(state)
        if checksum != expected:
            raise _CorruptCheckpoint(f"checksum mismatch: the arrays read back as {checksum}, saved as {expected}")
        if not finite:
            raise _CorruptCheckpoint("it holds non-finite values")
        return state

    def _set_aside(self, step: int) -> str:
        """Moves ``<step>/`` to ``<step>.corrupt-<time>`` (a name Orbax ignores), or deletes it; says which."""
        src = self.directory / str(step)
        if self.delete_corrupt:
            shutil.rmtree(src)
            return "deleted it"
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dst = self.directory / f"{step}.corrupt-{stamp}"
        n = 1
        while dst.exists():
            n += 1
            dst = self.directory / f"{step}.corrupt-{stamp}-{n}"
        os.replace(src, dst)
        return f"moved it aside to {dst.name}"

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def _test_acc(metrics: Mapping[str, Any]) -> float:
    return float(metrics["test_acc"])

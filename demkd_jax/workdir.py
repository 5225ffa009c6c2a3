"""The workdir of one run: claimed exclusively (:func:`claimed`), its metrics log crash-safe (:class:`MetricsLog`),
its config kept to refuse a resume with another one (:func:`check_resume_config`). Details: docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import tempfile
import time
from typing import Any, Callable, Iterator

from demkd_jax import interrupts
from demkd_jax.config import ConfigError

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
# Set it to resume a workdir whose saved config differs in result-changing fields.
ALLOW_CONFIG_CHANGE = "checkpoint.allow_config_change"
# Config fields that a resumed run may change without changing what it computes (prefix matches a section). The
# mesh is one of them: a run on 1 or 8 devices computes the same steps (tests/test_sharding.py), and a checkpoint
# restores onto any mesh.
RESULT_NEUTRAL = ("num_epochs", "progress_bar", "log_every_steps", "eval_batch_size", "on_nonfinite",
                  "distributed", "mesh.", "data.cache_dir", "data.use_cache", "data.num_workers", "data.tfds_data_dir",
                  "data.download", "checkpoint.")


class WorkdirError(ConfigError):
    """The workdir cannot be used for this run (locked by another run, or holding a run of another config)."""


class WorkdirLock:
    """An exclusive ``flock`` on ``<workdir>/.lock`` holding the owner's pid, host and start time."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], Any] = print) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_owner(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise WorkdirError(f"cannot lock workdir {str(self.workdir)!r} ({os.strerror(e.errno)})") from None
                raise WorkdirError(f"workdir {str(self.workdir)!r} is in use by another run ({_describe(holder)}); "
                                   "wait for it to end, or use another --workdir") from None
            # The previous holder unlinks the file when it releases it: the lock must be on the file still there.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        stale = _read_owner(fd)
        if stale:
            log(f"took over the stale lock of a run that is gone ({_describe(stale)}) in {self.workdir}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.learning_rate": 0.05, ...}``: the leaves of nested dicts by dotted key."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {key: leaf for k, v in tree.items() for key, leaf in _flatten(v, f"{prefix}{k}.").items()}


def _is_neutral(key: str) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in RESULT_NEUTRAL)


def config_changes(saved: dict, config) -> list[str]:
    """``key: old -> new`` for each result-changing field of ``config`` that differs from ``saved``."""
    old, new = _flatten(saved), _flatten(json.loads(config.to_json_best_effort()))
    missing = "(absent)"
    return [f"{k}: {json.dumps(old.get(k, missing))} -> {json.dumps(new.get(k, missing))}"
            for k in sorted(set(old) | set(new))
            if not _is_neutral(k) and old.get(k, missing) != new.get(k, missing)]


def check_resume_config(workdir: pathlib.Path, config, log: Callable[[str], Any] = print) -> None:
    """Refuses to resume the run in ``workdir`` with a config whose result-changing fields differ from its
    ``config.json``, naming them (``config.checkpoint.allow_config_change=True`` resumes anyway)."""
    path, checkpoints = workdir / CONFIG_NAME, workdir / "checkpoints"
    if not (path.is_file() and checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        return
    allow = bool(config.checkpoint.get("allow_config_change", False))
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if allow:
            log(f"{path} is unreadable ({type(e).__name__}); resuming without comparing configs "
                f"({ALLOW_CONFIG_CHANGE})")
            return
        raise WorkdirError(f"{str(path)!r} (the config of the run to resume) is unreadable ({type(e).__name__}: "
                           f"{e}); restore it, or set --config.{ALLOW_CONFIG_CHANGE}=True to resume anyway") from None
    changes = config_changes(saved if isinstance(saved, dict) else {}, config)
    if not changes:
        return
    listed = "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
    if not allow:
        raise WorkdirError(f"workdir {str(workdir)!r} holds a run with another config ({listed}); resuming it would "
                           f"mix the two: use another --workdir, or set --config.{ALLOW_CONFIG_CHANGE}=True to resume "
                           "it with the new values")
    log(f"resuming {workdir} with a changed config ({listed}) ({ALLOW_CONFIG_CHANGE})")


def record_config(workdir: pathlib.Path, config, step: int) -> None:
    """Writes ``config.json`` (atomically). On a resume at ``step`` whose result-changing fields were changed
    (:func:`check_resume_config` allowed it), the one already there is kept as ``config.step<N>.json``."""
    path = workdir / CONFIG_NAME
    with interrupts.critical():
        if step > 0 and path.is_file() and config_changes(_read_json_or_empty(path), config):
            os.replace(path, workdir / f"config.step{step}.json")
        write_text_atomic(path, config.to_json_best_effort(indent=2))


def _read_json_or_empty(path: pathlib.Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return saved if isinstance(saved, dict) else {}


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` via a temporary file, fsync and an atomic rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def first_missing(path: pathlib.Path) -> pathlib.Path | None:
    """The outermost directory of ``path`` that does not exist yet (what ``mkdir -p`` creates), or None."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _holds_no_file(root: pathlib.Path) -> bool:
    return all(p.is_dir() or p.name == LOCK_NAME for p in root.rglob("*"))


@contextlib.contextmanager
def claimed(workdir: pathlib.Path, config, *, lock: bool = True,
            log: Callable[[str], Any] = print) -> Iterator[pathlib.Path]:
    """The run's workdir, created and locked for the block (``lock=False``: another process of the run holds
    it) and checked against the config of the run it holds. If the block fails and wrote no file, the
    directories it created are removed again."""
    workdir = pathlib.Path(workdir).absolute()
    created = first_missing(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    held = WorkdirLock(workdir)  # releasing one never acquired (lock=False) does nothing
    try:
        if lock:
            held.acquire(log)
        check_resume_config(workdir, config, log)
        yield workdir
    except BaseException:
        held.release()  # before the directories it created are removed
        if created is not None and created.is_dir() and _holds_no_file(created):
            shutil.rmtree(created)
        raise
    finally:
        held.release()


class MetricsLog:
    """``metrics.jsonl`` in the workdir: one JSON object per epoch, keyed by its ``step``. ``writable=False``
    (every process but process 0 of a multi-host run) reads but never writes."""

    def __init__(self, workdir: pathlib.Path, writable: bool = True):
        self.path = pathlib.Path(workdir) / METRICS_NAME
        self.writable = writable

    def read(self) -> list[dict]:
        """The records in the file; a line cut by a crash (or otherwise unreadable) is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
        return records

    def resume(self, step: int, saved: list[dict] = (), log: Callable[[str], Any] = print) -> list[dict]:
        """On resume at ``step`` (0: a fresh start): the records up to it, from the file and, for any the file
        lost, from ``saved`` (the copy kept in the checkpoint); the file is rewritten atomically to hold them."""
        by_step: dict[int, dict] = {}
        for rec in self.read():
            if isinstance(rec.get("step"), int) and rec["step"] <= step:
                by_step.setdefault(rec["step"], rec)
        lost = [r for r in saved if isinstance(r.get("step"), int) and r["step"] <= step and r["step"] not in by_step]
        by_step.update((r["step"], r) for r in lost)
        kept = [by_step[s] for s in sorted(by_step)]
        if lost:
            log(f"{self.path} had lost the records of epoch(s) {', '.join(str(r.get('epoch')) for r in lost)}; "
                "restored them from the checkpoint")
        if self.writable:
            with interrupts.critical():
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def write(self, record: dict) -> None:
        """Appends one record and syncs it to disk before returning (a completed epoch's record survives a crash)."""
        if not self.writable:
            return
        with interrupts.critical(), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

"""The decoded-dataset cache: one uncompressed ``.npz`` per (source, name, input, input fingerprint).

Keyed by the input's size and mtime, written atomically, never trusted when unreadable (docs/data.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import re
import uuid
import zipfile

import numpy as np
from absl import logging

from demkd_jax.data.dataset import RawData

# Bump when the meaning of a cached file changes (a reader's output, the file layout).
CACHE_FORMAT = 1

_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    """``cache_dir``; if empty ``$DEMKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/demkd_jax``, else ``~/.cache/demkd_jax``."""
    cache_dir = cache_dir or os.environ.get("DEMKD_CACHE_DIR")
    if cache_dir:
        return pathlib.Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "demkd_jax"


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def path_fingerprint(path: str | os.PathLike) -> str:
    """A string that changes when the file (or any file under the directory) changes size or mtime."""
    path = pathlib.Path(path)
    if path.is_file():
        st = path.stat()
        return f"file:{st.st_size}:{st.st_mtime_ns}"
    if path.is_dir():
        h = hashlib.sha256()
        count = 0
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for fn in sorted(filenames):
                full = os.path.join(dirpath, fn)
                try:
                    st = os.stat(full)
                except OSError:  # a broken link or a file removed while walking
                    continue
                h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                count += 1
        return f"dir:{count}:{h.hexdigest()}"
    return "absent"


def cache_path(cache_dir: pathlib.Path, source: str, name: str, identity: str, fingerprint: str) -> pathlib.Path:
    """Where the cache for this input lives. ``identity``: what the input is (resolved path, options)."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", name)[:40] or "data"
    stem = f"{source}-{slug}-{_digest(f'{CACHE_FORMAT}|{source}|{name}|{identity}', 10)}"
    return cache_dir / f"{stem}-{_digest(fingerprint, 12)}.npz"


def load(path: pathlib.Path) -> tuple[RawData, tuple[np.ndarray, np.ndarray]] | None:
    """``(data, (train mean, train std))`` from the cache, or None when absent or unreadable (then removed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAYS}
            names = tuple(str(n) for n in z["class_names"].tolist())
            stats = (z["train_mean"], z["train_std"])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        logging.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, e)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return RawData(class_names=names, **arrays), stats


def save(path: pathlib.Path, raw: RawData, stats: tuple[np.ndarray, np.ndarray]) -> None:
    """Writes ``raw`` and its train ``(mean, std)`` atomically; removes older caches of the same input.

    A failure (read-only or full disk) only logs a warning.
    """
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique per writer; opened with "xb" so the file gets the umask's usual permissions.
        tmp_name = str(path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
        with open(tmp_name, "xb") as f:
            np.savez(f, class_names=np.asarray(raw.class_names, dtype=np.str_), train_mean=stats[0], train_std=stats[1],
                     **{k: getattr(raw, k) for k in _ARRAYS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as e:
        logging.warning("could not write the data cache %s (%s); continuing without it", path, e)
        return
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(prefix + "*.npz"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
                logging.info("removed stale data cache %s", old)

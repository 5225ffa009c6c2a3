"""Fetching the official CIFAR python-pickle archives: once, verified, resumable, never read half-written.

A file under the final name is always complete and MD5-verified; how: docs/data.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pathlib
import sys
import urllib.error
import urllib.request
from typing import Iterator

from demkd_jax.data.dataset import DataFormatError, DataNotFoundError, reason

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent downloads into one cache are not serialised
    fcntl = None

# name -> (file name, URL, MD5) of the official archives (https://www.cs.toronto.edu/~kriz/cifar.html; the
# same MD5s torchvision checks).
OFFICIAL_ARCHIVES = {
    "cifar100": ("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
    "cifar10": ("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
}

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_ATTEMPTS = 3  # an interrupted transfer that made progress is resumed at once, this many times in all
# What a dropped connection or an unreachable server raises (URLError and socket.timeout are OSErrors).
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class DownloadError(DataNotFoundError):
    """An archive could not be downloaded (no network, server error, interrupted transfer)."""


class _Interrupted(Exception):
    """The transfer stopped before the end; the partial file is kept for a resume."""


def md5_of(path: pathlib.Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _directory_lock(directory: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory lock on the directory itself (so no lock file is left behind)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # e.g. NFS, which emulates flock: go on unlocked (the MD5 check stays)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    return reason(e)


def _transfer(url: str, part: pathlib.Path, label: str) -> None:
    """Appends the rest of ``url`` to ``part`` (all of it when ``part`` is absent or the server ignores Range).

    Raises :class:`_Interrupted` when the body ends early or the connection drops mid-body; connection and
    HTTP errors before the body propagate.
    """
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "demkd_jax"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing after `offset`: the partial file is already whole
            return
        raise
    with response:
        resumed = offset and response.status == 206 and (
            response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"))
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
            file=sys.stderr, dynamic_ncols=True,
        ) as bar:
            try:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
            except _NETWORK_ERRORS as e:
                raise _Interrupted(f"{_reason(e)} after {received} of {total or '?'} bytes") from e
            finally:
                f.flush()
                os.fsync(f.fileno())
        if total is not None and received < total:
            raise _Interrupted(f"the connection closed after {received} of {total} bytes")


def fetch_archive(url: str, dest: pathlib.Path, md5: str, *, placement_hint: str) -> pathlib.Path:
    """``dest``, downloaded from ``url`` first when absent; its MD5 must be ``md5``.

    ``placement_hint`` ends every "cannot download" message (how to provide the file without a network).
    Raises :class:`DownloadError` when the download fails (the partial file is kept and the next call
    resumes it) and :class:`DataFormatError` when a file's checksum is wrong (a downloaded one is deleted).
    """
    md5 = md5.lower()
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _directory_lock(dest.parent):
            if not dest.is_file():  # another process may have finished it while we waited for the lock
                _download(url, dest, md5, placement_hint)
                return dest
    got = md5_of(dest)
    if got != md5:
        raise DataFormatError(
            f"{dest} has MD5 {got} but {md5} was expected; it is not the expected archive (delete it to "
            f"download it again from {url})"
        )
    return dest


def _download(url: str, dest: pathlib.Path, md5: str, placement_hint: str) -> None:
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, _ATTEMPTS + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            _transfer(url, part, f"downloading {dest.name}")
            break
        except _Interrupted as e:
            if attempt < _ATTEMPTS and part.exists() and part.stat().st_size > before:  # it made progress
                continue
            raise DownloadError(
                f"the download of {url} was interrupted ({e}); run again to resume it (the partial file "
                f"{part} is kept), or {placement_hint}"
            ) from e
        except _NETWORK_ERRORS as e:  # unreachable, refused, HTTP error status, timeout
            kept = part.stat().st_size if part.exists() else 0
            resume = f"; {kept} bytes so far are kept in {part} and the next run resumes" if kept else ""
            raise DownloadError(f"cannot download {url} ({_reason(e)}){resume}; {placement_hint}") from e
    got = md5_of(part)
    if got != md5:
        part.unlink()
        raise DataFormatError(
            f"the file downloaded from {url} has MD5 {got} but {md5} was expected, so it was deleted (a "
            f"corrupted transfer or a different file at that address; check data.download_url and "
            f"data.download_md5)"
        )
    os.replace(part, dest)

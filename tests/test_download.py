"""The official-archive fallback of source 'tfds': download (once, verified, resumable) from a local HTTP server.

The server (stdlib http.server on 127.0.0.1) serves an archive in the official CIFAR-100 format that the test
builds, honours ``Range`` requests like the real one, and can cut a transfer or die mid-way.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, repo_env
from demkd_jax import data
from demkd_jax.data import download
from test_data import raises, write_cifar100_pickle

ARCHIVE = "cifar-100-python.tar.gz"


class ArchiveServer:
    """Serves ``payload`` at ``/cifar-100-python.tar.gz``; ``cut_after``/``die_after`` bytes break a transfer."""

    def __init__(self, payload: bytes, port: int = 0):
        self.payload = payload
        self.ranges: list[str | None] = []  # the Range header of every request
        self.cut_after: int | None = None  # the next transfer stops after this many body bytes
        self.die_after: int | None = None  # ... and the server then stops serving
        self.dead = False
        self.delay_s = 0.0  # before each body
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.ranges.append(self.headers.get("Range"))
                if server.dead:
                    self.close_connection = True
                    return  # dropped without a response, as by a server that has gone away
                if self.path != "/" + ARCHIVE:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    if start >= len(server.payload):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                time.sleep(server.delay_s)
                limit = server.cut_after if server.cut_after is not None else server.die_after
                if limit is not None:
                    body = body[:limit]
                    server.dead = server.die_after is not None
                    server.cut_after = server.die_after = None
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/{ARCHIVE}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(bytes, md5, the written splits) of a tiny archive in the official CIFAR-100 layout."""
    root = tmp_path_factory.mktemp("official")
    splits = write_cifar100_pickle(root, np.random.default_rng(0), n=(40, 20))
    payload = (root / ARCHIVE).read_bytes()
    return payload, hashlib.md5(payload).hexdigest(), splits


@pytest.fixture
def server(archive):
    s = ArchiveServer(archive[0])
    yield s
    s.stop()


def load(tmp_path, url: str, md5: str, **overrides) -> data.Dataset:
    cfg = data.default_data_config()
    cfg.update(source="tfds", name="cifar100", num_classes=4, tfds_data_dir=str(tmp_path / "tfds"),
               cache_dir=str(tmp_path / "cache"), download_url=url, download_md5=md5, **overrides)
    return data.load_dataset(cfg)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{ARCHIVE}"


def test_downloads_once_verifies_and_reads_the_archive(tmp_path, archive, server):
    payload, md5, splits = archive
    ds = load(tmp_path, server.url, md5)
    assert ds.source == "pickle" and ds.num_classes == 4 and server.ranges == [None]
    np.testing.assert_array_equal(ds.train_images, splits["train"][0])
    np.testing.assert_array_equal(ds.test_labels, splits["test"][1])
    assert (tmp_path / "cache" / ARCHIVE).read_bytes() == payload
    assert not list((tmp_path / "cache").glob("*.part"))
    server.stop()
    # The decoded cache is keyed by the verified MD5: a later run needs neither the server nor the archive.
    (tmp_path / "cache" / ARCHIVE).unlink()
    again = load(tmp_path, server.url, md5)
    np.testing.assert_array_equal(again.train_images, ds.train_images)
    # Without the decoded cache the archive already there is read, and nothing is fetched.
    (tmp_path / "cache" / ARCHIVE).write_bytes(payload)
    third = load(tmp_path, closed_port_url(), md5, use_cache=False)
    np.testing.assert_array_equal(third.test_images, ds.test_images)


def test_a_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, archive, server):
    wrong = "0" * 32
    with raises(data.DataFormatError, f"has MD5 {archive[1]} but {wrong} was expected", "deleted", server.url):
        load(tmp_path, server.url, wrong)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_placed_archive_with_the_wrong_checksum_is_an_error_and_kept(tmp_path, archive):
    placed = tmp_path / "cache" / ARCHIVE
    placed.parent.mkdir()
    placed.write_bytes(archive[0][:-1])
    with raises(data.DataFormatError, str(placed), f"but {archive[1]} was expected", "delete it"):
        load(tmp_path, closed_port_url(), archive[1])
    assert placed.is_file()


def test_a_cut_transfer_resumes_at_once(tmp_path, archive, server):
    server.cut_after = len(archive[0]) // 3
    ds = load(tmp_path, server.url, archive[1])
    assert server.ranges == [None, f"bytes={len(archive[0]) // 3}-"]
    np.testing.assert_array_equal(ds.train_images, archive[2]["train"][0])


def test_a_server_dying_mid_download_keeps_the_part_and_a_rerun_completes(tmp_path, archive, server):
    payload, md5, splits = archive
    half = len(payload) // 2
    server.die_after = half
    part = tmp_path / "cache" / (ARCHIVE + ".part")
    with raises(data.DownloadError, "cannot download", f"{half} bytes so far are kept in {part}", "next run resumes",
                f"place {ARCHIVE} (MD5 {md5}"):
        load(tmp_path, server.url, md5)
    assert part.stat().st_size == half and not (tmp_path / "cache" / ARCHIVE).exists()
    server.stop()
    revived = ArchiveServer(payload, port=server.port)
    try:
        ds = load(tmp_path, revived.url, md5)
    finally:
        revived.stop()
    assert revived.ranges == [f"bytes={half}-"] and not part.exists()
    np.testing.assert_array_equal(ds.train_images, splits["train"][0])


def test_concurrent_fetches_into_one_cache_download_once(tmp_path, archive, server):
    server.delay_s = 0.5  # both fetches are under way before the first transfer starts
    dest = tmp_path / "cache" / ARCHIVE
    results = []
    fetch = lambda: results.append(download.fetch_archive(server.url, dest, archive[1], placement_hint="-"))  # noqa: E731
    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [dest, dest] and server.ranges == [None] and dest.read_bytes() == archive[0]


def test_no_network_is_one_clear_line(tmp_path, archive):
    url = closed_port_url()
    cache = tmp_path / "cache"
    with raises(data.DownloadError, f"cannot download {url}", "ConnectionRefusedError",
                f"without a network place {ARCHIVE} (MD5 {archive[1]}, from {url}) at {cache / ARCHIVE}",
                "data.source='pickle'"):
        load(tmp_path, url, archive[1])
    assert not list(cache.glob("*"))


def test_download_false_keeps_tfds_and_a_bad_md5_setting_is_refused(tmp_path, archive):
    with raises(data.DatasetNotPreparedError, "'cifar100' is not prepared"):
        load(tmp_path, closed_port_url(), archive[1], download=False)
    with raises(data.DataConfigError, "data.download_md5='abc'", "32 hexadecimal digits"):
        load(tmp_path, closed_port_url(), "abc")


def test_the_main_command_downloads_verifies_and_trains(tmp_path, server):
    """The headline command on a fresh machine: vgg8.py, data from the (local) archive address, one epoch."""
    names = [b"class%d" % i for i in range(100)]
    root = tmp_path / "official"
    write_cifar100_pickle(root, np.random.default_rng(1), names=names, n=(128, 50))
    server.payload = (root / ARCHIVE).read_bytes()
    md5 = hashlib.md5(server.payload).hexdigest()
    cmd = [sys.executable, "-m", "demkd_jax.main", "--config", str(REPO_ROOT / "configs" / "vgg8.py"),
           "--workdir", str(tmp_path / "run"), "--config.num_epochs=1", "--config.teachers.num_epochs=1",
           "--config.teachers.num=2", "--config.teachers.model=resnet8", "--config.teachers.width=0.25",
           "--config.student.width=0.125", "--config.eval_batch_size=50", "--config.progress_bar=False",
           f"--config.data.cache_dir={tmp_path / 'cache'}", f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
           f"--config.data.download_url={server.url}", f"--config.data.download_md5={md5}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=repo_env(JAX_DISABLE_MOST_OPTIMIZATIONS="true"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert server.ranges == [None] and f"downloading {ARCHIVE}" in out.stderr
    assert (tmp_path / "cache" / ARCHIVE).read_bytes() == server.payload
    assert "summary:" in out.stdout and (tmp_path / "run" / "summary.json").is_file()

"""Host-memory tunables: when they apply, the entry points' re-execution, and their effect on page faults."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
from conftest import repo_env

from demkd_jax import hostmem

APPLIES = hostmem.tunables_apply({})
needs_tunables = pytest.mark.skipif(
    not APPLIES, reason=f"needs Linux, glibc >= 2.35 and transparent huge pages; here {platform.system()}, "
    f"{platform.libc_ver()}, THP {hostmem.transparent_huge_pages()!r}")


def test_tunables_apply_only_where_they_change_something():
    linux = dict(system="Linux", libc=("glibc", "2.36"), thp="madvise")
    assert hostmem.tunables_apply({}, **linux)
    assert hostmem.tunables_apply({}, **{**linux, "thp": "always"})
    assert not hostmem.tunables_apply({}, **{**linux, "thp": "never"})
    assert not hostmem.tunables_apply({}, **{**linux, "thp": ""})
    assert not hostmem.tunables_apply({}, **{**linux, "system": "Darwin"})
    assert not hostmem.tunables_apply({}, **{**linux, "libc": ("", "")})  # musl
    assert not hostmem.tunables_apply({}, **{**linux, "libc": ("glibc", "2.31")})  # no hugetlb tunable yet
    assert hostmem.tunables_apply({}, **{**linux, "libc": ("glibc", "2.40")})
    assert not hostmem.tunables_apply({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **linux)
    assert not hostmem.tunables_apply({hostmem.OPT_OUT: "1"}, **linux)
    assert hostmem.tunables_apply({hostmem.OPT_OUT: "0"}, **linux)


def _run(script, tmp_path, *args, **env):
    path = tmp_path / "entry.py"
    path.write_text(textwrap.dedent(script))
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, check=True,
                          env=repo_env(environ, **env)).stdout


ENTRY = """
    import os, sys
    from demkd_jax import hostmem
    if __name__ == "__main__":
        print("started", flush=True)
        hostmem.reexec_with_tunables()
        print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
"""


@needs_tunables
def test_entry_point_reexecutes_once_with_the_tunables_and_its_arguments(tmp_path):
    out = _run(ENTRY, tmp_path, "--config", "a b").splitlines()
    assert out == ["started", "started", f"{hostmem.TUNABLES} ['--config', 'a b']"]
    assert _run(ENTRY, tmp_path, "x", **{hostmem.OPT_OUT: "1"}).splitlines() == ["started", "None ['x']"]
    mine = "glibc.malloc.arena_max=4"
    assert _run(ENTRY, tmp_path, GLIBC_TUNABLES=mine).splitlines() == ["started", f"{mine} []"]


FAULTS = """
    import resource
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: x * 2 + 1)
    x = jnp.ones((16 * 1024 * 1024,), jnp.float32)  # 64 MB in, 64 MB out per call
    for _ in range(3):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        f(x).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@needs_tunables
def test_huge_pages_remove_most_page_faults_of_fresh_xla_buffers(tmp_path):
    env = {"JAX_PLATFORMS": "cpu"}
    default = int(_run(FAULTS, tmp_path, **env))
    huge = int(_run(FAULTS, tmp_path, GLIBC_TUNABLES=hostmem.TUNABLES, **env))
    # 10 fresh 64 MB outputs touch ~160,000 new 4 KiB pages with the default allocator, 2 MiB pages with it.
    assert default > 40_000, default
    assert huge < default / 10, (huge, default)

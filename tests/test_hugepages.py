"""Host-memory tunables: when they apply, the entry points' re-execution, and their effect on page faults."""

import os
import platform
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import repo_env

from demkd_jax import hugepages

APPLIES = hugepages.tunables_apply({})
needs_tunables = pytest.mark.skipif(
    not APPLIES, reason=f"needs Linux, glibc >= 2.35 and transparent huge pages; here {platform.system()}, "
    f"{platform.libc_ver()}, THP {hugepages.transparent_huge_pages()!r}")


def test_tunables_apply_only_where_they_change_something():
    linux = dict(system="Linux", libc=("glibc", "2.36"), thp="madvise")
    assert hugepages.tunables_apply({}, **linux)
    assert hugepages.tunables_apply({}, **{**linux, "thp": "always"})
    assert not hugepages.tunables_apply({}, **{**linux, "thp": "never"})
    assert not hugepages.tunables_apply({}, **{**linux, "thp": ""})
    assert not hugepages.tunables_apply({}, **{**linux, "system": "Darwin"})
    assert not hugepages.tunables_apply({}, **{**linux, "libc": ("", "")})  # musl
    assert not hugepages.tunables_apply({}, **{**linux, "libc": ("glibc", "2.31")})  # no hugetlb tunable yet
    assert hugepages.tunables_apply({}, **{**linux, "libc": ("glibc", "2.40")})
    assert not hugepages.tunables_apply({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **linux)
    assert not hugepages.tunables_apply({hugepages.OPT_OUT: "1"}, **linux)
    assert hugepages.tunables_apply({hugepages.OPT_OUT: "0"}, **linux)


def _run(script, tmp_path, *args, python_options=(), stdin=None, **env):
    """stdout of ``python [python_options] entry.py args`` (JAX_PLATFORMS=cpu unless given), and its stderr."""
    path = tmp_path / "entry.py"
    path.write_text(textwrap.dedent(script))
    drop = ("GLIBC_TUNABLES", hugepages.OPT_OUT, "JAX_PLATFORMS", "JAX_PLATFORM_NAME")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    if "PYTHONPATH" in env:  # in addition to the repository (repo_env)
        environ["PYTHONPATH"] = env.pop("PYTHONPATH")
    env.setdefault("JAX_PLATFORMS", "cpu")
    out = subprocess.run([sys.executable, *python_options, str(path), *args], capture_output=True, text=True,
                         check=True, input=stdin, env=repo_env(environ, **env))
    return out.stdout, out.stderr


ENTRY = """
    import os, sys
    from demkd_jax import hugepages
    if __name__ == "__main__":
        print("started", flush=True)
        hugepages.restart_with_huge_pages()
        print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], sys.flags.dev_mode, sys.flags.utf8_mode)
"""
RESTART_LINE = f"demkd_jax: restarting with GLIBC_TUNABLES={hugepages.TUNABLES}"


def _not_reexecuted(out):
    return out == ["started", "None [] False 0"]


@needs_tunables
def test_entry_point_reexecutes_once_with_the_tunables_and_its_arguments(tmp_path):
    out, err = _run(ENTRY, tmp_path, "--config", "a b")
    assert out.splitlines() == ["started", "started", f"{hugepages.TUNABLES} ['--config', 'a b'] False 0"]
    assert [line for line in err.splitlines() if "demkd_jax: restarting" in line] == [
        f"{RESTART_LINE} (huge pages for XLA:CPU buffers; {hugepages.OPT_OUT}=1 turns this off)"]
    out, err = _run(ENTRY, tmp_path, "x", **{hugepages.OPT_OUT: "1"})
    assert out.splitlines() == ["started", "None ['x'] False 0"] and RESTART_LINE not in err
    mine = "glibc.malloc.arena_max=4"
    assert _run(ENTRY, tmp_path, GLIBC_TUNABLES=mine)[0].splitlines() == ["started", f"{mine} [] False 0"]


@needs_tunables
def test_interpreter_options_survive_the_reexecution(tmp_path):
    out, _ = _run(ENTRY, tmp_path, "y", python_options=("-X", "dev", "-X", "utf8", "-W", "ignore"))
    assert out.splitlines() == ["started", "started", f"{hugepages.TUNABLES} ['y'] True 1"]


def test_only_a_program_started_by_its_own_command_line_reexecutes():
    assert hugepages._run_by_its_own_command_line(["py", "-X", "dev", "e.py", "a"], ["e.py", "a"])
    assert hugepages._run_by_its_own_command_line(["py", "-m", "demkd_jax.main", "-x"], ["/r/demkd_jax/main.py", "-x"])
    assert not hugepages._run_by_its_own_command_line(["py", "-m", "pdb", "e.py"], ["e.py"])
    assert not hugepages._run_by_its_own_command_line(["py", "-m", "cProfile", "-m", "pkg.mod"], ["pkg.mod"])
    assert not hugepages._run_by_its_own_command_line(["py", "-mtrace", "e.py"], ["e.py"])
    assert not hugepages._run_by_its_own_command_line(["py", "e.py", "a"], ["e.py", "b"])  # argv rewritten
    assert not hugepages._run_by_its_own_command_line(["py", "e.py"], ["other.py"])


def test_accelerator_hosts_never_reexecute():
    assert hugepages.may_use_accelerator({"JAX_PLATFORMS": "cuda"}, plugins=[])
    assert hugepages.may_use_accelerator({"JAX_PLATFORMS": "tpu,cpu"}, plugins=[])
    assert hugepages.may_use_accelerator({"JAX_PLATFORM_NAME": "gpu"}, plugins=[])
    assert hugepages.may_use_accelerator({}, plugins=["xla_cuda12"])
    assert hugepages.may_use_accelerator({"JAX_PLATFORMS": ""}, plugins=["libtpu"])
    assert not hugepages.may_use_accelerator({"JAX_PLATFORMS": "cpu"}, plugins=["xla_cuda12"])  # forced to CPU
    assert not hugepages.may_use_accelerator({}, plugins=[])


@needs_tunables
def test_no_reexecution_with_a_gpu_platform_or_plugin_installed(tmp_path):
    out, err = _run(ENTRY, tmp_path, JAX_PLATFORMS="cuda")
    assert _not_reexecuted(out.splitlines()) and RESTART_LINE not in err
    plugin = tmp_path / "plugins" / "jax_plugins" / "xla_fake_gpu"  # what a jax-cuda12-plugin install adds
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    assert "xla_fake_gpu" in subprocess.run(
        [sys.executable, "-c", "from demkd_jax import hugepages; print(hugepages.accelerator_plugins())"],
        capture_output=True, text=True, check=True, env=repo_env({"PYTHONPATH": str(tmp_path / "plugins")})).stdout
    out, _ = _run(ENTRY, tmp_path, JAX_PLATFORMS="", PYTHONPATH=str(tmp_path / "plugins"))
    assert _not_reexecuted(out.splitlines())


@needs_tunables
def test_no_reexecution_under_a_debugger_or_from_python_c(tmp_path):
    traced = ENTRY.replace("import os, sys", "import os, sys\n    sys.settrace(lambda *a: None)")
    assert _not_reexecuted(_run(traced, tmp_path)[0].splitlines())
    # pdb drops its trace function on "continue" without breakpoints; its "-m pdb" still keeps it.
    out, _ = _run(ENTRY, tmp_path, python_options=("-m", "pdb"), stdin="continue\nquit\n")
    assert len(re.findall(r"\bstarted\b", out)) == 1 and hugepages.TUNABLES not in out and "None [] False 0" in out
    code = "from demkd_jax import hugepages; print('started'); hugepages.restart_with_huge_pages(); print('went on')"
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    out = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True, text=True, check=True,
                         env=repo_env(environ, JAX_PLATFORMS="cpu"))
    assert out.stdout.splitlines() == ["started", "went on"] and RESTART_LINE not in out.stderr


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
    default = int(_run(FAULTS, tmp_path, **env)[0])
    huge = int(_run(FAULTS, tmp_path, GLIBC_TUNABLES=hugepages.TUNABLES, **env)[0])
    # 10 fresh 64 MB outputs touch ~160,000 new 4 KiB pages with the default allocator, 2 MiB pages with it.
    assert default > 40_000, default
    assert huge < default / 10, (huge, default)

"""Host memory for CPU runs: transparent huge pages for the buffers XLA allocates every step.

XLA:CPU mallocs every step's temporaries and outputs afresh, and glibc maps large blocks from the kernel and
unmaps them when freed, so every step touches fresh 4 KiB pages: on a 2-core VM the 3 x vgg13 -> vgg8 DE-MKD
step took ~94,000 page faults and ~200 ms of kernel time per ~850 ms. With ``glibc.malloc.hugetlb=1`` malloc
asks for 2 MiB transparent huge pages: ~500 faults, and the step went from 847-886 to 718-756 ms (keeping freed
memory in the process instead removed every fault but ran slower, 794-827 ms: more user time).

glibc reads ``GLIBC_TUNABLES`` only when a process starts (``mallopt`` from a running Python did not change the
fault count), so the command-line entry points re-execute themselves once with it set, saying so on stderr. It
needs Linux, glibc >= 2.35 and transparent huge pages not switched off. A ``GLIBC_TUNABLES`` already set is left
alone; ``DEMKD_DEFAULT_MALLOC=1`` turns this off; elsewhere (a notebook, your own script) start Python with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. A process that may use a GPU/TPU, runs under a debugger or another
module (``-m pdb``), or cannot be started again from its command line never re-executes (:func:`reexec_blocker`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import pkgutil
import platform
import sys

TUNABLES = "glibc.malloc.hugetlb=1"
OPT_OUT = "DEMKD_DEFAULT_MALLOC"
THP_ENABLED = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``), or ``""`` where it cannot be read."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return ""
    return text[text.index("[") + 1:text.index("]")] if "[" in text and "]" in text else ""


def tunables_apply(environ=None, system: str | None = None, libc: tuple[str, str] | None = None,
                   thp: str | None = None) -> bool:
    """Whether a re-execution with :data:`TUNABLES` would change anything."""
    environ = os.environ if environ is None else environ
    system = platform.system() if system is None else system
    name, version = platform.libc_ver() if libc is None else libc
    thp = transparent_huge_pages() if thp is None else thp
    try:
        new_enough = tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        new_enough = False
    return (system == "Linux" and name == "glibc" and new_enough and thp in ("always", "madvise")
            and "GLIBC_TUNABLES" not in environ and environ.get(OPT_OUT, "") in ("", "0"))


def accelerator_plugins() -> list[str]:
    """The installed JAX accelerator plugins (found without importing them or starting a backend)."""
    found = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        found.update(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
    if importlib.util.find_spec("libtpu") is not None or os.environ.get("TPU_LIBRARY_PATH"):
        found.add("libtpu")
    return sorted(found)


def may_use_accelerator(environ=None, plugins: list[str] | None = None) -> bool:
    """Whether JAX in this process may pick a GPU/TPU: by ``JAX_PLATFORMS``, else by the installed plugins."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    if platforms.strip():
        return any(p.strip().lower() not in ("cpu", "") for p in platforms.split(","))
    return bool(accelerator_plugins() if plugins is None else plugins)


def _debugged() -> bool:
    if sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: debuggers such as debugpy use it
    return monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None


def _run_by_its_own_command_line(orig_argv: list[str], argv: list[str]) -> bool:
    """Whether ``orig_argv`` (the interpreter's command line) starts ``argv`` (this program) directly: not
    through another module (``python -m pdb script``, ``python -m cProfile -m package.module``)."""
    i = len(orig_argv) - len(argv)  # where the script path or the -m module name stands
    if i < 1 or not argv or orig_argv[i + 1:] != argv[1:]:
        return False
    options = orig_argv[1:i]
    if options[-1:] == ["-m"]:
        options = options[:-1]
    elif os.path.abspath(orig_argv[i]) != os.path.abspath(argv[0]):
        return False
    return not any(o.startswith("-m") for o in options)


def reexec_blocker(environ=None) -> str:
    """Why this process must not re-execute itself with :data:`TUNABLES`, or ``""`` if it may."""
    if may_use_accelerator(environ):
        return "a GPU/TPU may be used"
    if _debugged():
        return "a debugger or tracer is attached"
    if sys.argv[:1] in (["-c"], ["-"], [""]) or sys.flags.interactive or hasattr(sys, "ps1"):
        return "the program cannot be started again from its command line"
    if not sys.executable or not _run_by_its_own_command_line(getattr(sys, "orig_argv", []), sys.argv):
        return "the program was not started directly by its command line (a debugger or profiler module?)"
    return ""


def restart_with_huge_pages() -> None:
    """Replaces this process by the same command line with ``GLIBC_TUNABLES`` set; returns if not applicable.

    Call it first thing under ``if __name__ == "__main__":`` (before JAX starts). The command line is re-run
    exactly as given (``sys.orig_argv``: interpreter options kept); the new process finds the variable set.
    """
    if not tunables_apply() or reexec_blocker():
        return
    print(f"demkd_jax: restarting with GLIBC_TUNABLES={TUNABLES} (huge pages for XLA:CPU buffers; "
          f"{OPT_OUT}=1 turns this off)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

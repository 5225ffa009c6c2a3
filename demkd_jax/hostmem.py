"""Host memory for CPU runs: transparent huge pages for the buffers XLA allocates every step.

XLA:CPU mallocs every step's temporaries and outputs afresh, and glibc maps large blocks from the kernel and
unmaps them when freed, so every step touches fresh 4 KiB pages: on the 2-core CI VM the 3 x vgg13 -> vgg8
DE-MKD step took ~94,000 page faults and ~200 ms of kernel time per ~850 ms step. With glibc's
``glibc.malloc.hugetlb=1`` malloc asks for transparent huge pages (2 MiB: 512x fewer faults, fewer TLB
misses): ~500 faults and ~50 ms of kernel time, and the step went from 847-886 to 718-756 ms (alternating
runs, same VM). Keeping freed memory in the process instead (one arena, no mmap, no trim) removed every
fault but ran slower (794-827 ms: more user time).

glibc reads ``GLIBC_TUNABLES`` only when a process starts (``mallopt`` from a running Python did not change
the fault count: measured), so the command-line entry points re-execute themselves once with it set. It
needs Linux, glibc >= 2.35 and transparent huge pages not switched off
(``/sys/kernel/mm/transparent_hugepage/enabled``). A ``GLIBC_TUNABLES`` already in the environment is left
alone; ``DEMKD_DEFAULT_MALLOC=1`` turns this off. Elsewhere (a notebook, your own script) start Python with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.
"""

from __future__ import annotations

import os
import pathlib
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


def reexec_with_tunables() -> None:
    """Replaces this process by the same command line with ``GLIBC_TUNABLES`` set; returns if not applicable.

    Call it first thing under ``if __name__ == "__main__":`` (before JAX starts). The re-executed process
    finds the variable set and goes on.
    """
    argv = getattr(sys, "orig_argv", None)
    if not tunables_apply() or not argv or argv[1:2] == ["-c"]:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, [sys.executable, *argv[1:]])

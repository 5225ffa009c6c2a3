"""Stopping cleanly on SIGINT (Ctrl-C) and SIGTERM: inside :func:`stop_on_signals` the first one raises
:class:`Interrupted`, held until the end of a :func:`critical` write; a second one ends the process at once.
How and why: docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was asked to stop by ``signum``; ``exit_status`` is the shell's 128 + signum (130, 143). A
    BaseException, like KeyboardInterrupt: an ``except Exception`` that classifies a read error (a checkpoint
    restore, say) as corruption must not catch it."""

    def __init__(self, signum: int):
        self.exit_status = 128 + int(signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


_depth = 0  # nesting of critical() sections in the main thread
_pending: int | None = None  # a signal received inside a critical section


def _handler(signum, frame) -> None:
    global _pending
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    if _depth:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def critical():
    """A write that a stop signal must not cut: the signal takes effect when the block is done."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():  # signals are only handled in the main thread
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Installs the handlers for the block (the previous ones come back after it)."""
    global _pending
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    _pending = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

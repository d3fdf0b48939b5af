"""SIGTERM (and SIGHUP) handled like Ctrl-C, so every run cleans up the same way.

Python turns SIGINT into ``KeyboardInterrupt``, which unwinds through the
``finally`` blocks that remove staging folders and roll a half-done commit
back. SIGTERM -- what ``kill``, ``timeout``, systemd and CI runners send --
would instead end the process on the spot, leaving a hidden staging folder
that may hold a whole model. :func:`terminations_as_interrupts` makes those
signals raise :class:`Terminated` (a ``KeyboardInterrupt``), so the same
clean-up runs and the CLI prints one line and exits ``128 + signal``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "exit_code_of", "terminations_as_interrupts"]

_HANDLED = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal other than SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def exit_code_of(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminations_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise :class:`Terminated`; handlers restored after.

    Only the main thread can install handlers; elsewhere (a caller running
    the CLI in a thread) the block leaves signal handling as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in _HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""Progress lines for the long steps of an export (loading, dequantizing, tracing).

A dynamo export of a 135M model is silent for a minute and a half; a user
watching the terminal deserves to know which step is running and that it is
still alive. Lines go to stderr (stdout carries the command's result), each
long step announces itself, prints a heartbeat while it runs and its time
when it ends.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

__all__ = ["Progress", "StepTime", "progress_bars_off"]


class StepTime:
    """The wall time of one step, filled in when the step ends."""

    def __init__(self) -> None:
        self.seconds = 0.0


class Progress:
    """Announces steps on ``stream`` (stderr by default); ``enabled=False`` is silent.

    ``heartbeat`` seconds between "still running" lines inside a step (0 turns
    them off).
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, heartbeat: float = 20.0) -> None:
        self._stream = stream
        self.enabled = enabled
        self.heartbeat = heartbeat

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"[qgraph export] {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[StepTime]:
        """Announce the block, beat while it runs, report its time (also in the yielded StepTime)."""
        self.note(f"{message} ...")
        timing = StepTime()
        start = time.perf_counter()
        stop = threading.Event()
        beater = None
        if self.enabled and self.heartbeat > 0:
            beater = threading.Thread(target=self._beat, args=(message, start, stop), daemon=True)
            beater.start()
        try:
            yield timing
        finally:
            stop.set()
            if beater is not None:
                beater.join()
            timing.seconds = time.perf_counter() - start
        self.note(f"{message}: done in {timing.seconds:.1f} s")

    def _beat(self, message: str, start: float, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat):
            self.note(f"{message}: still running ({time.perf_counter() - start:.0f} s)")


@contextlib.contextmanager
def progress_bars_off() -> Iterator[None]:
    """No tqdm bars from transformers, huggingface_hub or anything else during the block (``--quiet``).

    transformers draws "Loading weights" (and GGUF dequantization) bars on
    stderr whatever its log level; tqdm reads ``TQDM_DISABLE`` when a bar is
    created, and transformers has its own switch.
    """
    import os

    saved = {key: os.environ.get(key) for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    os.environ.update({key: "1" for key in saved})
    transformers_logging = None
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging
    was_enabled = transformers_logging.is_progress_bar_enabled() if transformers_logging else False
    if transformers_logging:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if transformers_logging and was_enabled:
            transformers_logging.enable_progress_bar()

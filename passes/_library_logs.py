"""Catching what wrapped libraries only log.

onnx_ir and onnxscript report some failures (a skipped adapter, a shape
inference error) as logged warnings and carry on; the passes that wrap them
collect those records to turn them into report notes or errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["captured_warnings"]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_warnings(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """Collect (and keep off the console) a library logger's warnings."""
    logger = logging.getLogger(logger_name)
    handler = _Collect()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved

"""Python warnings on the command line as one line each: ``qgraph optimize: warning: ...``.

Python's default format prints the source path and line of the code that
warned, which tells a user of the CLI nothing and looks like a crash.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

__all__ = ["warnings_as_lines"]


@contextlib.contextmanager
def warnings_as_lines(prefix: str) -> Iterator[None]:
    """Within the block, each warning prints as ``<prefix>: warning: <message>`` on stderr."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - warnings' signature
        text = str(message).strip().replace("\n", " ")
        print(f"{prefix}: warning: {text}", file=file or sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous

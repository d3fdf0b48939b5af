"""Where verification keeps its temporary state, so none of it lands in the user's folders.

hypothesis stores what it learns (its example database, and since 6.1xx the
constants it collects from local source files) under ``.hypothesis/`` in
the current directory. A user running ``qgraph check`` or ``--verify`` in a
project folder did not ask for that folder, so every search qgraph runs
gets a private hypothesis home in a temporary folder, removed afterwards.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import hypothesis.configuration as configuration

__all__ = ["private_hypothesis_home"]


@contextlib.contextmanager
def private_hypothesis_home() -> Iterator[None]:
    """Within the block hypothesis writes into a temporary folder; the previous setting is restored after."""
    previous = getattr(configuration, "__hypothesis_home_directory", None)
    with tempfile.TemporaryDirectory(prefix="qgraph-hypothesis-") as home:
        configuration.set_hypothesis_home_dir(home)
        try:
            yield
        finally:
            configuration.set_hypothesis_home_dir(previous)

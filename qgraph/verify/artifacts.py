"""Where a failed check's inputs (and in-memory models) go, and whether they stay.

A failed equivalence check writes ``inputs.npz`` so the failure can be
replayed. Left in a fresh ``qgraph-verify-*`` temporary folder on every
failure, those pile up with nothing to remove them, so the command line
keeps them only when asked (``qgraph check --keep DIR``, ``optimize
--verify-keep DIR``): the reproduction command then names that folder.
Otherwise they live in a temporary folder for the duration of the check and
the report says how to keep them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["artifacts_folder"]


@contextlib.contextmanager
def artifacts_folder(
    keep: str | os.PathLike[str] | None, clean_up: bool, keep_option: str
) -> Iterator[tuple[str | None, Callable[[Any], None]]]:
    """(folder for check_equivalent's ``artifacts_dir``, a function to call on its result).

    With ``keep`` the folder is ``keep`` and stays. With ``clean_up`` it is a
    temporary folder removed on exit, and the function strips the result's
    paths to it, adding a note naming ``keep_option``. Otherwise (library
    callers) the check makes its own folder, kept as before.
    """
    if keep is not None:
        os.makedirs(keep, exist_ok=True)
        yield os.fspath(keep), lambda result: None
        return
    if not clean_up:
        yield None, lambda result: None
        return

    def forget(result: Any) -> None:
        if getattr(result, "inputs_path", None) is None:
            return
        result.inputs_path = None
        result.reproduction = None
        result.notes.append(f"the failing inputs were not kept: rerun with {keep_option} to save them and get a reproduction command")

    with tempfile.TemporaryDirectory(prefix="qgraph-verify-") as folder:
        yield folder, forget

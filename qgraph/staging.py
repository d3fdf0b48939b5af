"""Staging folders for atomic writes, and the lock that makes a commit one step.

Files are written into a hidden staging folder beside their destination and
renamed into place at the end (``qgraph.io.save``). A run that is killed
(SIGKILL, a crash, a power cut) cannot remove its staging folder, and one can
hold a whole model, so the folders are *named* (``.<file>.<random>`` +
:data:`STAGING_SUFFIX`) and *locked* (``flock`` on the folder while its run
lives): the kernel drops the lock when the process dies, so a later run can
tell an abandoned folder from a live one without trusting process ids, and
removes it (:func:`remove_stale`).

:func:`commit_lock` serializes the final renames of every qgraph writer in a
folder, so two runs writing the same ``OUT.onnx`` cannot interleave their
data-file and model-file renames and leave a mismatched pair.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["STAGING_SUFFIX", "Staging", "commit_lock", "remove_stale"]

#: Every staging folder's name ends with this, so stale ones can be found.
STAGING_SUFFIX = ".qgraph-staging"


class Staging:
    """A locked, hidden staging folder in ``folder`` for the file ``name``.

    Created on construction (stale staging folders of dead runs in the same
    folder are removed first); :meth:`close` removes it and its contents.
    """

    def __init__(self, folder: Path, name: str) -> None:
        remove_stale(folder)
        self.path = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.", suffix=STAGING_SUFFIX))
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` whose run is gone; return them.

    A folder whose lock can be taken has no living owner. Errors are ignored:
    cleaning up after others must never fail this run.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(STAGING_SUFFIX)):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a living run holds it
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def commit_lock(folders: Iterable[Path]) -> Iterator[None]:
    """Hold an exclusive lock on each folder (in a fixed order, so no deadlock) while renaming into them."""
    fds: list[int] = []
    try:
        for folder in sorted({os.path.realpath(f) for f in folders}):
            fd = os.open(folder, os.O_RDONLY)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # closing the descriptor releases its lock

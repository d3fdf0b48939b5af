"""The files one run will write, checked against its inputs and each other before it starts.

A run can write several files (``-o OUT.onnx``, ``OUT.onnx.data``, the
``--report``, sidecars). If two of them are the same file, or one of them is
an input, the later write silently destroys the earlier one -- a model
replaced by its own report, exit 0. And a destination that cannot be written
(a missing folder, a folder, ``/proc``) should be refused before minutes of
passes, not after. :func:`check_destinations` does both, naming the option
and path at fault; ``qgraph.io.save`` repeats the input checks when it
writes (it also knows the sidecar names, which appear only after the run).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from qgraph.errors import BadInputError

__all__ = ["check_destinations", "same_file"]


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (links, ``..`` and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_folder(role: str, path: Path) -> None:
    folder = path.parent
    if path.is_dir():
        raise BadInputError(f"{role} {path}: is a folder; give the path of a file")
    if not folder.exists():
        raise BadInputError(f"{role} {path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise BadInputError(f"{role} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"{role} {path}: cannot write into {folder} (permission denied)")


def check_destinations(outputs: Mapping[str, str | os.PathLike[str]], inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse before any work if an output cannot be written, is an input, or is another output.

    ``outputs`` maps a role (``"-o"``, ``"--report"``...) to a path;
    ``inputs`` lists (description, path) of every file the run reads.

    Raises:
        BadInputError: naming the role and path at fault.
    """
    resolved = {role: Path(os.path.abspath(p)) for role, p in outputs.items()}
    input_list = list(inputs)
    for role, path in resolved.items():
        for what, source in input_list:
            if same_file(path, source):
                raise BadInputError(
                    f"{role} {outputs[role]} is {what} ({source}); qgraph never overwrites its input"
                )
        _check_folder(role, path)
    roles = list(resolved)
    for i, role in enumerate(roles):
        for other in roles[i + 1 :]:
            if same_file(resolved[role], resolved[other]):
                raise BadInputError(
                    f"{role} {outputs[role]} is the same file as {other} {outputs[other]}; "
                    "one would overwrite the other"
                )

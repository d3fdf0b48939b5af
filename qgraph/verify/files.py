"""The body of ``qgraph check A.onnx B.onnx``: files in, exit code out.

Exit codes are the CLI contract (docs/design.md): 0 the models are equivalent,
1 they are not (the report and a reproduction command are printed), 2 bad
input (a missing file, not an ONNX model, a reference onnxruntime cannot
load, inputs/outputs that do not correspond) -- the message names the file.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from qgraph.errors import BadInputError
from qgraph.verify.artifacts import artifacts_folder
from qgraph.verify.equivalence import (
    DEFAULT_EXAMPLES,
    EquivalenceResult,
    check_equivalent,
    replay,
)

__all__ = ["check_files", "replay_files"]


def _finish(result: EquivalenceResult, out: TextIO) -> int:
    print(result, file=out)
    return 0 if result.equivalent else 1


def check_files(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    examples: int = DEFAULT_EXAMPLES,
    out: TextIO | None = None,
    *,
    seed: int | None = 0,
    err: TextIO | None = None,
    keep: str | os.PathLike[str] | None = None,
    clean_up: bool = False,
) -> int:
    """Check that model B computes what model A computes; return the exit code.

    Bad input is printed to ``err`` (stderr by default) as
    ``qgraph check: <message>`` and returns 2. A failure's inputs go to
    ``keep`` (a folder) when given; otherwise to a temporary folder, which is
    removed when ``clean_up`` (the CLI's default: the report then says how
    to keep them).
    """
    out = out if out is not None else sys.stdout
    try:
        with artifacts_folder(keep, clean_up, "--keep DIR") as (folder, forget):
            result = check_equivalent(path_a, path_b, examples=examples, seed=seed, artifacts_dir=folder)
            forget(result)
    except BadInputError as exc:
        print(f"qgraph check: {exc}", file=err if err is not None else sys.stderr)
        return BadInputError.exit_code
    return _finish(result, out)


def replay_files(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    inputs: str | os.PathLike[str],
    out: TextIO | None = None,
    *,
    err: TextIO | None = None,
    elementwise: bool = False,
) -> int:
    """Compare A and B on saved inputs (a failure's ``inputs.npz``); same exit codes.

    ``elementwise`` judges every element against its dtype's tolerance (the
    rule self-check's comparison) instead of scaling it by the output's range.
    """
    out = out if out is not None else sys.stdout
    try:
        tolerances = None
        if elementwise:
            from qgraph import io as qio
            from qgraph.verify.compare import elementwise_tolerances

            tolerances = elementwise_tolerances(qio.load(path_a))
        result = replay(path_a, path_b, inputs, tolerances=tolerances)
    except BadInputError as exc:
        print(f"qgraph check: {exc}", file=err if err is not None else sys.stderr)
        return BadInputError.exit_code
    return _finish(result, out)

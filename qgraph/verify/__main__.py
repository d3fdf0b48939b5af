"""``python -m qgraph.verify A.onnx B.onnx [--inputs X.npz]``: the reproduction command.

Without ``--inputs`` it is ``qgraph check``; with it, it replays the saved
failing example that a failed check printed. Exit codes: 0 equal, 1 differ,
2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from qgraph.verify.equivalence import DEFAULT_EXAMPLES
from qgraph.verify.files import check_files, replay_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgraph.verify", description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="model A, the reference")
    parser.add_argument("candidate", help="model B, checked against A")
    parser.add_argument("--inputs", help="replay these saved inputs (.npz) instead of drawing new ones")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="inputs to try")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn inputs")
    parser.add_argument("--elementwise", action="store_true",
                        help="judge each element against the dtype tolerance, not the output's range (as verify-rules does)")
    args = parser.parse_args(argv)
    if args.inputs:
        return replay_files(args.reference, args.candidate, args.inputs, elementwise=args.elementwise)
    return check_files(args.reference, args.candidate, args.examples, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())

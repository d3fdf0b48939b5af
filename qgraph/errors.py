"""Errors that carry the CLI's exit-code contract.

Other tools script against qgraph's exit codes (docs/design.md), so the kind of a
failure is decided where it is raised, not guessed at the top level:
``BadInputError`` (exit 2) means the caller gave something unusable and
nothing was written; ``PassFailure`` (exit 1) means the input was fine but a
pass, an invariant or an equivalence check failed.
"""

from __future__ import annotations


class QGraphError(Exception):
    """Base of every error qgraph reports to a user."""

    exit_code = 1


class BadInputError(QGraphError):
    """The input file, pass name, option or usage is wrong (exit code 2)."""

    exit_code = 2


class PassFailure(QGraphError):
    """A pass, invariant or check failed on a valid input (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, *, pass_name: str | None = None) -> None:
        super().__init__(message)
        self.pass_name = pass_name


class InvariantViolation(PassFailure):
    """A pass left the model in a state that breaks a graph invariant."""


class RewriteError(PassFailure):
    """A rewrite rule produced an invalid replacement or looped on itself."""

    def __init__(self, message: str, *, rule_name: str, pass_name: str | None = None) -> None:
        super().__init__(message, pass_name=pass_name)
        self.rule_name = rule_name


class UnwritableOutputError(BadInputError, OSError):
    """An output could not be written (exit code 2, the path named); nothing was written.

    Also an ``OSError``, which is what a write failure was before qgraph
    named it, so callers that catch ``OSError`` still do.
    """

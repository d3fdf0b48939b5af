"""Op types and attribute names of rules, checked against the ONNX schemas.

A misspelled op in a pattern (``op.Rleu``) is not an error to the matcher: it
just never matches, and the rule self-check then fails on an unrelated
onnx-checker message. So a rule is checked when it is defined: every pattern
node in a domain onnx defines schemas for (``ai.onnx``, ``ai.onnx.ml``, ...)
must name an op that exists at the rule's opset, and its attributes must be
attributes of that op in some version up to that opset -- patterns match
exports of older opsets too (``ReduceMean(axes=...)`` before opset 18).
Custom domains (``com.microsoft``, a device's) are exempt: their ops have no
schema here. Replacements are built only when a rule fires, so the
replacement builder runs the same check on each node it creates.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable

import onnx

__all__ = ["RuleDefinitionError", "op_problem"]


class RuleDefinitionError(ValueError):
    """A rule names an op or attribute that does not exist; raised at definition."""


@functools.cache
def _history() -> dict[tuple[str, str], list[tuple[int, frozenset[str]]]]:
    """(domain, op) -> [(since_version, attribute names)] for every schema onnx knows."""
    table: dict[tuple[str, str], list[tuple[int, frozenset[str]]]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        table.setdefault((schema.domain, schema.name), []).append(
            (schema.since_version, frozenset(schema.attributes))
        )
    return table


@functools.cache
def _checked_domains() -> frozenset[str]:
    return frozenset(domain for domain, _ in _history())


def _qualified(domain: str, op_type: str) -> str:
    return f"{domain}::{op_type}" if domain else op_type


def op_problem(domain: str, op_type: str, attributes: Iterable[str], opset: int | None) -> str | None:
    """Why ``domain::op_type`` with these attribute names is not an ONNX op at ``opset``, or None.

    ``opset`` None means the newest opset onnx knows. Custom domains give None.
    """
    domain = "" if domain == "ai.onnx" else domain
    if domain not in _checked_domains():
        return None
    limit = opset if opset is not None else onnx.defs.onnx_opset_version()
    versions = _history().get((domain, op_type))
    if versions is None:
        names = [op for d, op in _history() if d == domain]
        close = difflib.get_close_matches(op_type, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"'{_qualified(domain, op_type)}' is not an ONNX op{hint}"
    known = [attrs for since, attrs in versions if since <= limit]
    if not known:
        first = min(since for since, _ in versions)
        return f"'{_qualified(domain, op_type)}' does not exist at opset {limit} (it appears at opset {first})"
    allowed = frozenset().union(*known)
    for name in attributes:
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"its attributes: {', '.join(sorted(allowed)) or 'none'}"
            return f"'{_qualified(domain, op_type)}' has no attribute '{name}' up to opset {limit}; {hint}"
    return None

"""Node counts and op histograms, shared by pass reports and ``inspect``.

Counting convention: a graph's count includes the subgraphs of its
control-flow nodes (If/Loop/Scan bodies run as part of it); a call to a
model-local function counts once, under the function's op name, because
that is the op the device compiler sees. Keys are ``op`` for ai.onnx and
``domain::op[:overload]`` otherwise; histograms are sorted by count, then
key, so equal inputs give identical JSON.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

__all__ = ["count_nodes", "op_histogram", "op_key"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def op_key(domain: str, op_type: str, overload: str = "") -> str:
    """Histogram key of an op: ``op`` for ai.onnx, else ``domain::op[:overload]``."""
    key = op_type if domain in _DEFAULT_DOMAINS else f"{domain}::{op_type}"
    return f"{key}:{overload}" if overload else key


def op_histogram(graph: ir.Graph | ir.Function) -> dict[str, int]:
    """Op counts of a graph or function body, nested subgraphs included."""
    counts = Counter(
        op_key(node.domain, node.op_type, node.overload)
        for node in ir.traversal.RecursiveGraphIterator(graph)
    )
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def count_nodes(graph: ir.Graph | ir.Function) -> int:
    """Number of nodes in a graph or function body, nested subgraphs included."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(graph))

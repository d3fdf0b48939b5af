"""Node counts and op histograms, as the report and ``inspect`` show them."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

__all__ = ["op_key", "count_nodes", "op_histogram"]


def op_key(node: ir.Node) -> str:
    """``Op`` for ai.onnx ops, ``domain::Op`` for every other domain."""
    domain = node.domain or ""
    return node.op_type if domain in ("", "ai.onnx") else f"{domain}::{node.op_type}"


def count_nodes(model: ir.Model) -> int:
    """Nodes of the main graph, its subgraphs included (not model functions)."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Op counts over the main graph and its subgraphs, most frequent first."""
    counts = Counter(op_key(n) for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

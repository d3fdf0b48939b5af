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
from collections.abc import Iterator

import onnx_ir as ir

__all__ = ["all_nodes", "count_nodes", "iter_nodes", "op_histogram", "op_key"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def op_key(domain: str, op_type: str, overload: str = "") -> str:
    """Histogram key of an op: ``op`` for ai.onnx, else ``domain::op[:overload]``."""
    key = op_type if domain in _DEFAULT_DOMAINS else f"{domain}::{op_type}"
    return f"{key}:{overload}" if overload else key


def iter_nodes(graph: ir.Graph | ir.Function) -> Iterator[ir.Node]:
    """Every node of a graph or function body, each followed by the nodes of its subgraphs.

    The same order as ``ir.traversal.RecursiveGraphIterator``, at about half
    its cost: the manager and most passes walk the whole model several times
    per pass, and on a 2000-node export that walk was a visible share of a
    pipeline's time. Nodes without attributes (most of them) are not looked
    into at all.
    """
    for node in graph:
        yield node
        if not node.attributes:
            continue
        for attr in node.attributes.values():
            if attr.is_ref():  # a function's reference attribute holds no graph
                continue
            if attr.type is ir.AttributeType.GRAPH:
                yield from iter_nodes(attr.value)
            elif attr.type is ir.AttributeType.GRAPHS:
                for subgraph in attr.value:
                    yield from iter_nodes(subgraph)


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the main graph, its subgraphs and the model-local functions."""
    yield from iter_nodes(model.graph)
    for function in model.functions.values():
        yield from iter_nodes(function)


def op_histogram(graph: ir.Graph | ir.Function) -> dict[str, int]:
    """Op counts of a graph or function body, nested subgraphs included."""
    counts = Counter(
        op_key(node.domain, node.op_type, node.overload)
        for node in iter_nodes(graph)
    )
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def count_nodes(graph: ir.Graph | ir.Function) -> int:
    """Number of nodes in a graph or function body, nested subgraphs included."""
    return sum(1 for _ in iter_nodes(graph))

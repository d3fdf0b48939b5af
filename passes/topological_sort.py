"""Topological sort of the graph, its subgraphs and functions, delegated to onnx_ir."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass as _IrTopologicalSortPass

from qgraph.errors import BadInputError
from qgraph.graph_stats import all_nodes
from qgraph.pass_base import Pass

__all__ = ["TopologicalSortPass"]


class TopologicalSortPass(Pass):
    """Order nodes so every value is produced before it is used (stable sort).

    Runs onnx_ir's ``TopologicalSortPass`` (``Graph.sort``, O(nodes + values)):
    the sort is stable, so independent nodes keep their relative order, and a
    node with subgraphs is placed after the producers of the outer values its
    subgraphs read. Subgraphs and functions are sorted too; unlike onnx_ir's
    pass, ``modified`` also reports a reordering that happened only inside a
    subgraph. A cyclic graph is not a valid ONNX graph: the pass raises
    ``BadInputError`` (the main graph may already be sorted when the cycle is
    in a function).
    """

    name = "topological-sort"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        order_before = list(all_nodes(model))
        try:
            _IrTopologicalSortPass()(model)
        except ValueError as e:
            raise BadInputError(f"pass '{self.name}': {e}") from e
        order_after = list(all_nodes(model))
        moved = sum(1 for a, b in zip(order_before, order_after) if a is not b)
        if moved:
            self.report.count("nodes-moved", moved)
            self.report.notes.append(f"{moved} node(s) changed position")
        return ir.passes.PassResult(model, modified=bool(moved))

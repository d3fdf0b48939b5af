"""Common-subexpression elimination, delegated to onnx_ir."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from qgraph.pass_base import Option, Pass

__all__ = ["CommonSubexpressionPass"]


class CommonSubexpressionPass(Pass):
    """Merge nodes that apply the same op, attributes and inputs into one node.

    Runs onnx_ir's ``CommonSubexpressionEliminationPass``: walking the main
    graph in order, a node whose (op, number of outputs, input values,
    attributes) equals an earlier node's is removed and its users read the
    earlier node's outputs. One sweep merges whole duplicated chains when the
    graph is topologically sorted. When both duplicates are graph outputs an
    ``Identity`` keeps the second output's name (``identity-elimination``
    leaves that Identity in place).

    Identities that produce a graph output are not merged: that would only
    trade one Identity for another (``b = Identity(a)`` for
    ``b = Identity(x)``), and constant folding trades it back, so the cleanup
    fixpoint would never settle.

    Limits (onnx_ir's): only the main graph (not subgraphs or functions);
    inputs are compared by identity, so ``Add(a, b)`` and ``Add(b, a)`` are
    not merged and two initializers with equal contents count as different
    (deduplicating those needs every weight read, which a cleanup pass must
    not do); nodes with subgraph attributes and random ops are never merged;
    tensor attributes with more than ``size_limit`` elements are not compared.
    """

    name = "cse"
    options = {
        "size_limit": Option(
            int,
            10,
            "tensor attributes (e.g. Constant values) with more elements than "
            "this are not compared, so such nodes are never merged",
        ),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before = set(model.graph)
        # Hide output Identities from the matcher: a unique overload makes
        # their (op, ...) key match nothing. Restored right after.
        outputs = frozenset(model.graph.outputs)
        hidden = [
            (node, node.overload)
            for node in model.graph
            if node.op_type == "Identity" and node.domain == "" and outputs.intersection(node.outputs)
        ]
        for i, (node, _) in enumerate(hidden):
            node.overload = f"qgraph.cse.kept.{i}"
        declared = [(value.name, value.type, value.shape) for value in model.graph.outputs]
        try:
            result = CommonSubexpressionEliminationPass(size_limit=self.config["size_limit"])(model)
        finally:
            for node, overload in hidden:
                node.overload = overload
        _keep_declared_output_types(model.graph, declared)
        merged = len(nodes_before - set(model.graph))
        if merged:
            self.report.count("nodes-merged", merged)
            self.report.notes.append(f"merged {merged} duplicate node(s)")
        return ir.passes.PassResult(model, modified=result.modified)


def _keep_declared_output_types(graph: ir.Graph, declared: list[tuple[str | None, ir.TypeProtocol | None, ir.Shape | None]]) -> None:
    """A graph output merged into an untyped duplicate takes back the type and shape it declared.

    onnx_ir keeps the earlier node's value and gives it the output's name,
    but not the output's type: an exporter's intermediate values often have
    none, and a graph output without a type is invalid ONNX.
    """
    for value, (name, type_, shape) in zip(graph.outputs, declared):
        if value.name == name:
            if value.type is None and type_ is not None:
                value.type = type_
            if value.shape is None and shape is not None:
                value.shape = shape

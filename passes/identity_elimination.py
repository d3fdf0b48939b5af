"""Identity elimination on onnx_ir's public API, with graph outputs keeping their names."""

from __future__ import annotations

import onnx_ir as ir

from qgraph.graph_stats import iter_nodes
from qgraph.pass_base import Pass

__all__ = ["IdentityEliminationPass"]


def _removable(node: ir.Node) -> bool:
    """Whether ``y = Identity(x)`` can go without changing the graph's signature.

    When ``y`` is not a graph output, its users simply read ``x``. When it is,
    ``x`` must take over the name ``y``, which is only right when ``x`` is
    produced by a node of the same graph and is not itself an input, an
    initializer or an output: renaming an output ``x`` would lose output
    ``x`` (both would be named ``y``; ``cse`` makes such duplicated outputs),
    and an ``x`` from an enclosing graph cannot be renamed from inside a
    subgraph.
    """
    if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
        return False
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
        return False
    source, output = node.inputs[0], node.outputs[0]
    if not output.is_graph_output():
        return True
    producer = source.producer()
    return producer is not None and producer.graph is node.graph and not source.is_graph_output()


def _merged_shape(kept: ir.Shape | None, other: ir.Shape | None) -> ir.Shape | None:
    """``kept`` with its unknown dims filled in from ``other`` (same rank), as Identity makes them equal."""
    if kept is None or other is None or len(kept) != len(other):
        return kept if kept is not None else other
    dims = []
    for a, b in zip(kept.dims, other.dims):
        known_a = isinstance(a, int) or a.value is not None
        dims.append(a if known_a or not (isinstance(b, int) or b.value is not None) else b)
    return ir.Shape(dims)


def _eliminate(node: ir.Node) -> None:
    source, output = node.inputs[0], node.outputs[0]
    source.shape = _merged_shape(source.shape, output.shape)
    if source.type is None:
        source.type = output.type
    was_output, name = output.is_graph_output(), output.name
    output.replace_all_uses_with(source, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    if was_output:
        source.name = name


class IdentityEliminationPass(Pass):
    """Remove Identity nodes, rewiring their users (graph output names are kept).

    Over the main graph, its subgraphs and the model-local functions: the
    users of ``y = Identity(x)`` read ``x`` instead; when ``y`` is a graph
    output, ``x`` is renamed to ``y`` so the model's output names do not
    change. An Identity stays when removing it would change the signature:
    ``y`` an output and ``x`` a graph input, an initializer, another output of
    the same graph, or a value of an enclosing graph. Only ai.onnx
    ``Identity`` is removed.
    """

    name = "identity-elimination"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        bodies: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
        removable = [node for body in bodies for node in iter_nodes(body) if _removable(node)]
        removed = 0
        for node in removable:
            # An earlier removal may have made this one an output's last link: look again.
            if node.graph is not None and _removable(node):
                _eliminate(node)
                removed += 1
        if removed:
            self.report.count("identities-removed", removed)
            self.report.notes.append(f"removed {removed} Identity node(s)")
        return ir.passes.PassResult(model, modified=removed > 0)

"""Identity elimination: onnx_ir's pass, guarded so graph outputs keep their names."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass as _IrIdentityEliminationPass

from qgraph.graph_stats import all_nodes
from qgraph.pass_base import Pass

__all__ = ["IdentityEliminationPass"]


def _renaming_is_safe(node: ir.Node) -> bool:
    """Whether ``y = Identity(x)`` may be removed when ``y`` is a graph output.

    onnx_ir then renames ``x`` to ``y`` and puts ``x`` in the output list. That
    is only right when ``x`` is produced by a node of the same graph and is not
    itself an output: renaming an output ``x`` makes the model lose output
    ``x`` (both outputs end up named ``y``), and an ``x`` from an outer scope
    would be renamed in the outer graph (onnx_ir raises there).
    """
    output = node.outputs[0]
    if not output.is_graph_output():
        return True
    source = node.inputs[0] if node.inputs else None
    if source is None:
        return True  # onnx_ir skips it anyway
    producer = source.producer()
    return producer is not None and producer.graph is node.graph and not source.is_graph_output()


# The guard hooks onnx_ir's per-node method; fail loudly if a new onnx_ir
# renames it instead of silently losing the guard.
if not callable(getattr(_IrIdentityEliminationPass, "_try_eliminate_identity_node", None)):
    raise ImportError(
        "identity-elimination needs onnx_ir's IdentityEliminationPass._try_eliminate_identity_node"
    )


class _GuardedIdentityElimination(_IrIdentityEliminationPass):
    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.outputs) == 1:
            if not _renaming_is_safe(node):
                return False
        return super()._try_eliminate_identity_node(node)


class IdentityEliminationPass(Pass):
    """Remove Identity nodes, rewiring their users (graph output names are kept).

    Runs onnx_ir's ``IdentityEliminationPass`` over the graph, its subgraphs
    and functions: the users of ``y = Identity(x)`` read ``x`` instead; when
    ``y`` is a graph output, ``x`` is renamed to ``y`` so the model's output
    names do not change.

    An Identity stays when removing it would change the signature: ``y`` an
    output and ``x`` a graph input or initializer (onnx_ir's rule), and — a
    guard this pass adds, because onnx_ir 1.1 gets it wrong — ``y`` an output
    and ``x`` another output of the same graph (onnx_ir renames ``x``, so
    output ``x`` disappears; this is what ``cse`` produces for duplicated
    outputs) or a value from an enclosing graph (onnx_ir raises). Only
    ai.onnx ``Identity`` is removed.
    """

    name = "identity-elimination"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before = set(all_nodes(model))
        result = _GuardedIdentityElimination()(model)
        removed = len(nodes_before - set(all_nodes(model)))
        if removed:
            self.report.count("identities-removed", removed)
            self.report.notes.append(f"removed {removed} Identity node(s)")
        return ir.passes.PassResult(model, modified=result.modified)

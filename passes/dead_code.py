"""Dead-code elimination, composed from onnx_ir's unused-removal passes."""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from qgraph.pass_base import Pass

__all__ = ["DeadCodeEliminationPass"]


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _arity(node: ir.Node) -> tuple[int, int, int]:
    return len(node.inputs), len(node.outputs), len(node.attributes)


def _opset_import_count(model: ir.Model) -> int:
    return len(model.opset_imports) + sum(len(f.opset_imports) for f in model.functions.values())


def _remove_unused_subgraph_initializers(model: ir.Model) -> int:
    # RemoveUnusedNodesPass only prunes the main graph's initializers.
    removed = 0
    for graph in model.graph.subgraphs():
        keep = frozenset(graph.inputs) | frozenset(graph.outputs)
        for init in list(graph.initializers.values()):
            if not init.uses() and init not in keep:
                assert init.name is not None
                del graph.initializers[init.name]
                removed += 1
    return removed


class DeadCodeEliminationPass(Pass):
    """Remove nodes, initializers, functions and opset imports that no output depends on.

    Composes onnx_ir's ``RemoveUnusedNodesPass`` (nodes in the graph, its
    subgraphs and every function; unused main-graph initializers), then
    ``RemoveUnusedFunctionsPass`` (functions not reachable from the graph) and
    ``RemoveUnusedOpsetsPass`` (imports no node uses; the default domain and
    the domains of remaining functions are always kept), and also prunes
    unused initializers of subgraphs.

    The model's signature is kept: graph inputs and outputs stay, and an
    initializer that is also a graph input (an overridable default) stays even
    when nothing reads it. As part of node removal, onnx_ir also drops unused
    trailing optional outputs (e.g. Dropout's mask) and trailing empty inputs
    of ai.onnx nodes; those count as a modification too. Nodes with side
    effects do not exist in ONNX, so "unused" means "no path to an output".
    """

    name = "dce"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        arity_before = {node: _arity(node) for node in _all_nodes(model)}
        initializers_before = len(model.graph.initializers)
        removed: dict[str, int] = {}

        RemoveUnusedNodesPass()(model)
        removed["nodes"] = len(arity_before) - sum(1 for _ in _all_nodes(model))
        removed["initializers"] = (
            initializers_before
            - len(model.graph.initializers)
            + _remove_unused_subgraph_initializers(model)
        )

        functions_before = len(model.functions)
        RemoveUnusedFunctionsPass()(model)
        removed["functions"] = functions_before - len(model.functions)

        opsets_before = _opset_import_count(model)
        RemoveUnusedOpsetsPass()(model)
        removed["opset-imports"] = opsets_before - _opset_import_count(model)

        nodes_after = list(_all_nodes(model))
        # Surviving nodes whose unused optional outputs / empty inputs were cut.
        trimmed = sum(1 for node in nodes_after if arity_before.get(node) != _arity(node))
        for what, n in removed.items():
            if n:
                self.report.count(f"removed-{what}", n)
        if trimmed:
            self.report.count("trimmed-nodes", trimmed)
        summary = [f"{n} {what}" for what, n in removed.items() if n]
        if summary:
            self.report.notes.append("removed " + ", ".join(summary))
        if trimmed:
            self.report.notes.append(f"trimmed unused optional outputs of {trimmed} node(s)")
        modified = any(removed.values()) or bool(trimmed)
        return ir.passes.PassResult(model, modified=modified)

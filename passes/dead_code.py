"""Dead-code elimination, composed from onnx_ir's unused-removal passes."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from qgraph.graph_stats import all_nodes, iter_nodes
from qgraph.pass_base import Pass

__all__ = ["DeadCodeEliminationPass"]


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


def _scan(model: ir.Model) -> tuple[bool, set[str]]:
    """(whether RemoveUnusedNodesPass could find anything, the domains the nodes use).

    Anything to prune means a node output nobody reads, a trailing empty
    input or an unused initializer; conservative (an unused output that is
    not optional counts too). One walk, a fraction of the cost of the
    onnx_ir passes, which look up every node's schema and walk the model
    once each; in a cleanup fixpoint most dce runs find nothing.
    """
    graphs = [model.graph, *model.graph.subgraphs()]
    kept = {v for g in [*graphs, *model.functions.values()] for v in g.outputs}
    prune = False
    domains: set[str] = set()
    for node in iter_nodes(model.graph):
        domains.add(node.domain)
        if not prune and (
            (node.inputs and node.inputs[-1] is None)
            or any(out not in kept and not out.uses() for out in node.outputs)
        ):
            prune = True
    for graph in graphs:
        signature = frozenset(graph.inputs) | frozenset(graph.outputs)
        if any(not init.uses() and init not in signature for init in graph.initializers.values()):
            prune = True
    return prune or bool(model.functions), domains


class DeadCodeEliminationPass(Pass):
    """Remove nodes, initializers, functions and opset imports that no output depends on.

    Composes onnx_ir's ``RemoveUnusedNodesPass`` (nodes in the graph, its
    subgraphs and every function; unused main-graph initializers), then
    ``RemoveUnusedFunctionsPass`` (functions not reachable from the graph) and
    ``RemoveUnusedOpsetsPass`` (imports no node uses; the default domain and
    the domains of remaining functions are always kept), and also prunes
    unused initializers of subgraphs. One walk first tells which of these
    can find anything at all; the others are not run (in a cleanup fixpoint
    most dce runs find nothing, and each onnx_ir pass walks the whole model).

    The model's signature is kept: graph inputs and outputs stay, and an
    initializer that is also a graph input (an overridable default) stays even
    when nothing reads it. As part of node removal, onnx_ir also drops unused
    trailing optional outputs (e.g. Dropout's mask) and trailing empty inputs
    of ai.onnx nodes; those count as a modification too. Nodes with side
    effects do not exist in ONNX, so "unused" means "no path to an output".
    """

    name = "dce"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed: dict[str, int] = {}
        arity_before: dict[ir.Node, tuple[int, int, int]] = {}
        prune, domains = _scan(model)
        if prune:
            arity_before = {node: _arity(node) for node in all_nodes(model)}
            initializers_before = len(model.graph.initializers)
            RemoveUnusedNodesPass()(model)
            removed["nodes"] = len(arity_before) - sum(1 for _ in all_nodes(model))
            removed["initializers"] = (
                initializers_before
                - len(model.graph.initializers)
                + _remove_unused_subgraph_initializers(model)
            )

        if model.functions:
            functions_before = len(model.functions)
            RemoveUnusedFunctionsPass()(model)
            removed["functions"] = functions_before - len(model.functions)

        # Unless nodes went or functions exist, the scan saw every domain in use.
        if prune or model.functions or set(model.opset_imports) - domains - {""}:
            opsets_before = _opset_import_count(model)
            RemoveUnusedOpsetsPass()(model)
            removed["opset-imports"] = opsets_before - _opset_import_count(model)

        # Surviving nodes whose unused optional outputs / empty inputs were cut.
        trimmed = sum(
            1 for node in all_nodes(model) if node in arity_before and arity_before[node] != _arity(node)
        ) if arity_before else 0
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

"""Which RMSNorm-looking subgraphs the rmsnorm rules left alone, and why.

A mean of squares (``ReduceMean(Pow(a, 2))`` or ``ReduceMean(Mul(a, a))``)
that is still in the graph after the pass is what a reader would call an
unfused RMSNorm. The rules are rooted at the scale multiply a few nodes
further down, so for each such ReduceMean this module looks at the Mul nodes
that follow it and reports the deepest attempt of any rule there (from
``qgraph.rewrite.explain``): which node, how far the pattern got and the
check that failed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from qgraph.rewrite import Candidate, RuleSet, explain

__all__ = ["unfused_notes"]

# How many nodes below the ReduceMean the scale multiply can sit:
# Add, Sqrt, Reciprocal, Mul, Cast, Mul is the longest chain the rules know.
_REACH = 7


def _label(node: ir.Node) -> str:
    return node.name or f"<producer of {node.outputs[0].name}>"


def _is_square(node: ir.Node | None) -> bool:
    if node is None or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    if node.op_type == "Mul":
        return a is not None and a is b
    if node.op_type == "Pow" and b is not None:
        exponent = ir.convenience.get_const_tensor(b)
        return exponent is not None and exponent.size == 1 and float(np.asarray(exponent.numpy()).reshape(-1)[0]) == 2.0
    return False


def _means_of_squares(graph: ir.Graph) -> Iterator[ir.Node]:
    for node in graph:
        if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx") and node.inputs:
            source = node.inputs[0]
            if source is not None and _is_square(source.producer()):
                yield node


def _muls_below(node: ir.Node) -> list[ir.Node]:
    found: list[ir.Node] = []
    seen = {node}
    frontier = [node]
    for _ in range(_REACH):
        nxt = []
        for n in frontier:
            for out in n.outputs:
                for user in out.consumers():
                    if user not in seen:
                        seen.add(user)
                        nxt.append(user)
                        if user.op_type == "Mul":
                            found.append(user)
        frontier = nxt
    return found


def unfused_notes(model: ir.Model, rules: RuleSet) -> list[str]:
    """One note per mean of squares left in the main graph."""
    leftovers = list(_means_of_squares(model.graph))
    if not leftovers:
        return []
    tried: dict[str, list[Candidate]] = {}
    for cand in explain(model, rules):
        if not cand.graph and not cand.matched:
            tried.setdefault(cand.node, []).append(cand)
    notes = []
    for mean in leftovers:
        head = f"RMSNorm-like mean of squares at ReduceMean '{_label(mean)}' not fused"
        roots = [tried[_label(m)] for m in _muls_below(mean) if _label(m) in tried]
        if not roots:
            notes.append(f"{head}: no scale multiply (Mul) follows it within {_REACH} nodes")
            continue
        # The Mul the rules got furthest at is the norm's scale multiply; every
        # rule's verdict there is shown, the furthest first.
        best = max(roots, key=lambda cands: max(c.nodes_matched / c.nodes_total for c in cands))
        best = sorted(best, key=lambda c: -c.nodes_matched / c.nodes_total)
        why = "; ".join(
            f"rule '{c.rule}' matched {c.nodes_matched}/{c.nodes_total} pattern nodes: {c.reason}" for c in best
        )
        notes.append(f"{head} (tried at {best[0].op_type} '{best[0].node}'): {why}")
    return notes

"""What every lowering of a concat-cache ``Attention`` to an onnxruntime kernel checks first.

``lower-gqa`` and ``lower-mha`` replace the same thing -- an ``Attention``
reading q, k, v, the mask and both past inputs, whose present outputs are
the graph's ``present.*`` -- with kernels that know nothing of the ONNX op's
extras. These checks, and the reasons they report, are one list so that the
two passes refuse the same layers for the same words; each pass then checks
what its own kernel needs (heads, rotary, dtype).
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["attribute", "concat_cache_reason", "remove_dead", "used"]


def attribute(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def used(value: ir.Value) -> bool:
    return bool(value.uses()) or value.is_graph_output()


def concat_cache_reason(node: ir.Node, graph_inputs: set[ir.Value], graph_outputs: set[ir.Value], *,
                        softcap_note: str | None) -> str | None:
    """Why ``node`` is not a concat-cache layer a fused kernel can stand in for, if it is not.

    ``softcap_note`` says, in the refusal, what the kernel lacks for a soft-capped layer (None: it takes one).
    """
    if len(node.inputs) != 6 or any(v is None for v in node.inputs):
        return "the Attention does not read q, k, v, a mask and both past inputs (run kv-cache and attention-io first)"
    past_k, past_v = node.inputs[4], node.inputs[5]
    if len(node.outputs) < 3 or any(o not in graph_outputs for o in node.outputs[1:3]):
        return "its present outputs are not the graph's present.* outputs"
    if len(node.outputs) > 3 and used(node.outputs[3]):
        return "its qk_matmul_output is in use"
    if past_k not in graph_inputs or past_v not in graph_inputs:
        return "its past inputs are not graph inputs"
    if softcap_note is not None and attribute(node, "softcap", 0.0):
        return f"softcap {attribute(node, 'softcap')} ({softcap_note})"
    if attribute(node, "is_causal", 0):
        return "is_causal with past inputs (kv-cache writes an explicit mask)"
    if attribute(node, "qk_matmul_output_mode", 0):
        return "a qk_matmul_output_mode is set"
    return None


def remove_dead(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove ``nodes`` and then their producers, as far as nothing else reads them (what a lowering replaced)."""
    stack = list(nodes)
    removed: set[ir.Node] = set()
    while stack:
        node = stack.pop()
        if node in removed or node.graph is not graph or any(used(o) for o in node.outputs):
            continue
        producers = [x.producer() for x in node.inputs if x is not None]
        graph.remove(node, safe=True)
        removed.add(node)
        stack.extend(p for p in producers if p is not None)

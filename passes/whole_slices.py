"""Slices proven to keep everything, and Concat operands proven empty, answered for ``shape-reads``.

A rotary written for a partial head splits it: ``cat(rotate(x[..., :d]),
x[..., d:])`` with d read at run time from the cos table (TorchScript's Phi-3,
whose tables span the whole head). Where d is the head size the first slice
is x and the second is empty, but the Concat stands between the rotation
and the heads, and attention-io cannot give the RotaryEmbedding packed
heads. With :mod:`qgraph_passes.dim_sources` proving the lengths:

* ``Slice(x)`` whose every sliced axis has a positive step and a length
  proven equal to x's there is x: increasing indices, as many as x has,
  inside ``[0, n)``, are ``0 .. n-1``.
* an operand of ``Concat`` whose length along the concat axis is proven 0
  adds no element; it is dropped, and a Concat left with one operand is
  that operand.

Both are exact wherever the original graph runs (dropping an empty operand
only drops Concat's check that its other dims agree).
"""

from __future__ import annotations

import onnx_ir as ir
from qgraph_passes.dim_sources import Const, DimSources

__all__ = ["drop_whole_slices_and_empty_operands"]


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _whole(dims: DimSources, node: ir.Node) -> bool:
    """Whether ``Slice`` node keeps all of its input (every dim of the output proven to be the input's)."""
    x, y = node.inputs[0], node.outputs[0]
    if x is None or x.shape is None or y.shape is None or len(x.shape) != len(y.shape) or len(node.inputs) < 3:
        return False
    steps = dims.entries(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if steps is not None and not all(isinstance(s, Const) and s > 0 for s in steps):
        return False  # a negative step of full length reverses
    if len(node.inputs) > 4 and node.inputs[4] is not None and steps is None:
        return False
    for axis in range(len(x.shape)):
        source = dims.source(y, axis)
        if source is None or source != dims.source(x, axis):
            return False
    return True


def _empty(dims: DimSources, value: ir.Value | None, axis: int) -> bool:
    return value is not None and value.shape is not None and dims.source(value, axis) == Const(0)


def drop_whole_slices_and_empty_operands(graph: ir.Graph, dims: DimSources) -> tuple[int, int]:
    """Rewrite the graph as the module docstring says; the numbers of Slices removed and of operands dropped."""
    slices = operands = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Slice" and not node.outputs[0].is_graph_output() and _whole(dims, node):
            ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
            graph.remove(node, safe=True)
            slices += 1
        elif node.op_type == "Concat" and len(node.inputs) > 1 and node.outputs[0].shape is not None:
            axis = _attr(node, "axis", 0) % len(node.outputs[0].shape)
            kept = [x for x in node.inputs if not _empty(dims, x, axis)]
            if len(kept) == len(node.inputs) or not kept:
                continue
            if len(kept) == 1 and node.outputs[0].is_graph_output():
                continue
            operands += len(node.inputs) - len(kept)
            if len(kept) == 1:
                ir.convenience.replace_all_uses_with(node.outputs[0], kept[0])
                graph.remove(node, safe=True)
                continue
            for i, x in enumerate(kept):
                node.replace_input_with(i, x)
            node.resize_inputs(len(kept))
    return slices, operands

"""Whether a rotary cos/sin table repeats its first half in its second half.

The half-rotation form of rotary embedding multiplies ``x`` by a table of
width D whose two halves are equal (``emb = cat(freqs, freqs)``, then
``cos(emb)``); ``RotaryEmbedding`` takes only the first half. Slicing the
table is exact only if that is so, and it cannot be seen in the table's
shape: it is read from how the table was made. The walk goes up through
ops that act on each element alone or on axes other than the last (casts,
cos/sin, scaling by a scalar, adding an axis in front) to a
``Concat(a, a)`` on the last axis. Anything else is answered with the
value where the walk stopped, so a rule can say why it did not fuse.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["halves_equal_reason"]

# Ops that compute each output element from the same-position input element.
_ELEMENTWISE = frozenset({"Cast", "Cos", "Sin", "Neg", "Identity"})
# Binary ops that keep equal halves equal when the other operand is one number.
_SCALAR_BINARY = frozenset({"Mul", "Div", "Add", "Sub"})
_MAX_DEPTH = 16


def _is_scalar_constant(value: ir.Value | None) -> bool:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return tensor is not None and tensor.size == 1


def _last_axis(node: ir.Node, rank: int | None) -> bool:
    attr = node.attributes.get("axis")
    axis = attr.value if attr is not None else 0
    return axis == -1 or (rank is not None and axis == rank - 1)


def _unsqueezes_in_front(node: ir.Node) -> bool:
    """An Unsqueeze that adds only axes before the last one keeps the last axis as it is."""
    axes = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
    out = node.outputs[0]
    if axes is None or out.shape is None:
        return False
    rank = len(out.shape)
    return all((int(a) % rank) != rank - 1 for a in np.asarray(axes.numpy()).reshape(-1))


def halves_equal_reason(value: ir.Value) -> str | None:
    """None if ``value``'s last axis is ``[t, t]`` by construction, else why that is not known."""
    current = value
    for _ in range(_MAX_DEPTH):
        node = current.producer()
        if node is None:
            return f"'{current.name}' is not computed in the graph (a table input or weight is not read)"
        if node.domain not in ("", "ai.onnx"):
            return f"'{current.name}' comes from {node.domain}::{node.op_type}"
        op = node.op_type
        if op == "Concat":
            rank = len(current.shape) if current.shape is not None else None
            if len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and _last_axis(node, rank):
                return None
            return f"'{current.name}' is a Concat, but not of one value with itself on the last axis"
        if op in _ELEMENTWISE:
            current = node.inputs[0]
        elif op in _SCALAR_BINARY and len(node.inputs) == 2:
            a, b = node.inputs
            if _is_scalar_constant(b):
                current = a
            elif _is_scalar_constant(a):
                current = b
            else:
                return f"'{current.name}' is a {op} of two tensors"
        elif op == "Unsqueeze" and _unsqueezes_in_front(node):
            current = node.inputs[0]
        else:
            return f"'{current.name}' comes from {op}, which may not keep the table's halves equal"
    return f"'{value.name}': more than {_MAX_DEPTH} ops between the table and its Concat"

"""The value of small integer tensors computed from constants and the static dims of shapes.

The TorchScript exporter spells ``x[..., : x.shape[-1] // 2]`` as
``Slice(x, 0, Unsqueeze(Div(Gather(Shape(x), 3), 2)))``: when x's head size
is a known number the bound is a constant in all but form, yet constant
folding keeps it (``Shape(x)`` has symbolic batch and sequence dims). This
module evaluates such a value when everything it reads is known: constants,
and ``Shape`` of values whose selected dims are numbers. A rule condition
then compares the number, whichever exporter wrote it. Anything else (a
symbolic dim, an op not listed) gives None.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["static_value"]

_MAX_DEPTH = 12
# Integer Div in ONNX truncates toward zero (numpy's // floors).
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": lambda a, b: np.fix(np.true_divide(a, b))}


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _shape(node: ir.Node) -> np.ndarray | None:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    rank = len(x.shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", rank)
    dims = x.shape.dims[slice(start, end)]
    if not all(isinstance(d, int) for d in dims):
        return None
    return np.array(dims, np.int64)


def _gathered_dims(node: ir.Node) -> np.ndarray | None:
    """Gather(Shape(x), i): known when dims i of x are, whatever x's other dims are."""
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    index = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or index is None:
        return None
    x = shape_node.inputs[0]
    if x is None or x.shape is None:
        return None
    dims = x.shape.dims[slice(_attr(shape_node, "start", 0), _attr(shape_node, "end", len(x.shape)))]
    picked = np.asarray(index.numpy())
    values = [dims[int(i)] for i in picked.reshape(-1)]
    if not all(isinstance(d, int) for d in values):
        return None
    return np.array(values, np.int64).reshape(picked.shape)


def _value(value: ir.Value | None, depth: int) -> np.ndarray | None:
    if value is None or depth > _MAX_DEPTH:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return np.asarray(tensor.numpy()) if tensor.size <= 64 else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Shape":
        return _shape(node)
    if node.op_type == "Gather" and _attr(node, "axis", 0) == 0 and len(node.inputs) == 2:
        picked = _gathered_dims(node)
        if picked is not None:
            return picked
    args = [_value(v, depth + 1) for v in node.inputs]
    if any(a is None for a in args[:1]):
        return None
    op = node.op_type
    if op in _BINARY and len(args) == 2 and args[1] is not None:
        if op == "Div" and not (np.issubdtype(args[0].dtype, np.integer) and np.issubdtype(args[1].dtype, np.integer)):
            return None
        return _BINARY[op](args[0], args[1]).astype(args[0].dtype)
    if op == "Gather" and len(args) == 2 and args[1] is not None and _attr(node, "axis", 0) == 0:
        return np.take(args[0], args[1], axis=0)
    if op in ("Unsqueeze", "Squeeze", "Reshape"):
        out = node.outputs[0].shape
        if out is not None and all(isinstance(d, int) for d in out.dims):
            return args[0].reshape(out.dims)
        if op == "Unsqueeze" and args[0].ndim == 0:  # a scalar made 1-D, the common case for slice bounds
            return args[0].reshape(1)
        return None
    if op == "Cast":
        return args[0].astype(ir.DataType(_attr(node, "to", 0)).numpy())
    if op == "Concat" and all(a is not None for a in args):
        return np.concatenate([np.atleast_1d(a) for a in args], axis=_attr(node, "axis", 0))
    if op == "Identity":
        return args[0]
    return None


def static_value(value: ir.Value | None) -> np.ndarray | None:
    """The value of ``value`` if it follows from constants and static dims alone, else None."""
    return _value(value, 0)

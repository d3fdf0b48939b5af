"""The value of small integer tensors computed from constants and the static dims of shapes.

The TorchScript exporter spells ``x[..., : x.shape[-1] // 2]`` as
``Slice(x, 0, Unsqueeze(Div(Gather(Shape(x), 3), 2)))``: when x's head size
is a known number the bound is a constant in all but form, yet constant
folding keeps it (``Shape(x)`` has symbolic batch and sequence dims). This
module evaluates such a value when everything it reads is known: constants,
and ``Shape`` of values whose selected dims are numbers. A rule condition
then compares the number, whichever exporter wrote it. Anything else (a
symbolic dim, an op not listed) gives None.

A dim is a number more often than the stored shapes say: TorchScript
exports reshape heads with ``Concat(Gather(Shape(x), 0), ..., -1, 16)``,
and onnx shape inference (without data propagation) leaves every dim of the
result symbolic, though the head size 16 is written in the graph.
:func:`static_dim` reads such a dim back through the op that made it
(Reshape's shape tensor, Slice bounds, Split sizes, Transpose, Unsqueeze,
Concat, element-wise ops with broadcasting), so ``static_value`` of
``Shape(x)`` sees it too: Falcon splits q, k and v off a fused projection,
GPT-NeoX slices its rotary part to ``cos.shape[-1]``, whose width comes from
the frequency table.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import onnx_ir as ir

__all__ = ["static_dim", "static_value"]

# Shape arithmetic reaches back through a few ops per dim; TorchScript's GPT-NeoX slices its rotary
# part by a width read from the cos table, itself computed from the frequencies: ~20 steps.
_MAX_DEPTH = 32


class _State(threading.local):
    memo: dict | None = None


_STATE = _State()


@contextlib.contextmanager
def _memo():
    """One memo per outermost call: a dim asked for along two paths (both operands of a residual sum reach
    back to the same stream) is worked out once, so the walk is linear in the values it visits."""
    if _STATE.memo is not None:
        yield
        return
    _STATE.memo = {}
    try:
        yield
    finally:
        _STATE.memo = None


# Integer Div in ONNX truncates toward zero (numpy's // floors).
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": lambda a, b: np.fix(np.true_divide(a, b))}
# Float ops of a scale computed from a head size (SDPA without a scale: 1 / sqrt(q.shape[-1]), applied as its
# square root to q and to k), evaluated in the operand's dtype as onnxruntime does (both correctly rounded).
_FLOAT_UNARY = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal}


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _shape(node: ir.Node, depth: int) -> np.ndarray | None:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    rank = len(x.shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", rank)
    dims = [_dim(x, axis, depth + 1) for axis in range(rank)[slice(start, end)]]
    if not all(isinstance(d, int) for d in dims):
        return None
    return np.array(dims, np.int64)


def _gathered_dims(node: ir.Node, depth: int) -> np.ndarray | None:
    """Gather(Shape(x), i): known when dims i of x are, whatever x's other dims are."""
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    index = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or index is None:
        return None
    x = shape_node.inputs[0]
    if x is None or x.shape is None:
        return None
    axes = list(range(len(x.shape)))[slice(_attr(shape_node, "start", 0), _attr(shape_node, "end", len(x.shape)))]
    picked = np.asarray(index.numpy())
    if not all(-len(axes) <= int(i) < len(axes) for i in picked.reshape(-1)):
        return None
    dims = [_dim(x, axis, depth + 1) for axis in axes]
    values = [dims[int(i)] for i in picked.reshape(-1)]
    if not all(isinstance(d, int) for d in values):
        return None
    return np.array(values, np.int64).reshape(picked.shape)


def _sliced_shape(node: ir.Node, depth: int) -> np.ndarray | None:
    """Slice(Shape(x), starts, ends[, 0[, steps]]): known when the dims it keeps are, whatever x's others are."""
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or len(node.inputs) < 3:
        return None
    x = shape_node.inputs[0]
    if x is None or x.shape is None:
        return None
    bounds = [ir.convenience.get_const_tensor(v) if v is not None else None for v in node.inputs[1:5]]
    if bounds[0] is None or bounds[1] is None or bounds[0].size != 1 or bounds[1].size != 1:
        return None
    if len(bounds) > 2 and bounds[2] is not None and int(bounds[2].numpy().reshape(-1)[0]) not in (0, -1):
        return None
    step = int(bounds[3].numpy().reshape(-1)[0]) if len(bounds) > 3 and bounds[3] is not None else 1
    if step == 0:
        return None
    axes = list(range(len(x.shape)))[slice(_attr(shape_node, "start", 0), _attr(shape_node, "end", len(x.shape)))]
    # ONNX Slice on one axis clamps its bounds as Python's slicing does
    kept = axes[slice(int(bounds[0].numpy().reshape(-1)[0]), int(bounds[1].numpy().reshape(-1)[0]), step)]
    dims = [_dim(x, axis, depth + 1) for axis in kept]
    if not all(isinstance(d, int) for d in dims):
        return None
    return np.array(dims, np.int64)


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
        return _shape(node, depth)
    if node.op_type == "Gather" and _attr(node, "axis", 0) == 0 and len(node.inputs) == 2:
        picked = _gathered_dims(node, depth)
        if picked is not None:
            return picked
    if node.op_type == "Slice":
        picked = _sliced_shape(node, depth)
        if picked is not None:
            return picked
    args = [_value(v, depth + 1) for v in node.inputs]
    if any(a is None for a in args[:1]):
        return None
    op = node.op_type
    if op in _BINARY and len(args) == 2 and args[1] is not None:
        if op == "Div" and np.issubdtype(args[0].dtype, np.floating):
            return np.true_divide(args[0], args[1]).astype(args[0].dtype)
        if op == "Div" and not (np.issubdtype(args[0].dtype, np.integer) and np.issubdtype(args[1].dtype, np.integer)):
            return None
        return _BINARY[op](args[0], args[1]).astype(args[0].dtype)
    if op in _FLOAT_UNARY and len(args) == 1 and np.issubdtype(args[0].dtype, np.floating):
        return _FLOAT_UNARY[op](args[0]).astype(args[0].dtype)
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
    if op == "ConstantOfShape" and args[0].size <= 8 and int(np.prod(args[0])) <= 64:
        fill = node.attributes.get("value")
        array = np.asarray(fill.value.numpy()).reshape(-1) if fill is not None else np.zeros(1, np.float32)
        return np.full([int(d) for d in args[0].reshape(-1)], array[0], dtype=array.dtype)
    return None


def static_value(value: ir.Value | None) -> np.ndarray | None:
    """The value of ``value`` if it follows from constants and static dims alone, else None."""
    with _memo():
        return _value(value, 0)


# Ops whose output has the input's shape (the first input's, for the binary ones only when the
# other operand is one number: broadcasting could otherwise widen a dim).
_SAME_SHAPE = frozenset({"Neg", "Identity", "Cast", "Cos", "Sin", "Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Exp"})


def _reshaped_dim(node: ir.Node, axis: int, depth: int) -> int | None:
    """Dim ``axis`` of Reshape's output when the shape tensor's entry there is a positive number."""
    shape = node.inputs[1] if len(node.inputs) > 1 else None
    if shape is None:
        return None
    whole = _value(shape, depth + 1)
    if whole is not None:
        entry = int(whole.reshape(-1)[axis]) if axis < whole.size else None
    else:  # Concat of pieces, some symbolic: the piece holding ``axis`` may still be a number
        producer = shape.producer()
        if producer is None or producer.op_type != "Concat":
            return None
        offset, entry = 0, None
        for piece in producer.inputs:
            length = piece.shape.dims[0] if piece is not None and piece.shape is not None and len(piece.shape) == 1 else None
            if not isinstance(length, int):
                return None
            if offset <= axis < offset + length:
                got = _value(piece, depth + 1)
                entry = int(got.reshape(-1)[axis - offset]) if got is not None else None
                break
            offset += length
    if entry is None or entry < 0:
        return None
    if entry == 0 and not _attr(node, "allowzero", 0):
        return _dim(node.inputs[0], axis, depth + 1)  # 0 copies the input's dim
    return entry


def _sliced_dim(node: ir.Node, axis: int, rank: int, depth: int) -> int | None:
    args = [_value(v, depth + 1) if v is not None else None for v in node.inputs[1:5]]
    starts, ends = args[0], args[1]
    axes = args[2] if len(args) > 2 and args[2] is not None else np.arange(0 if starts is None else starts.size)
    steps = args[3] if len(args) > 3 and args[3] is not None else np.ones_like(axes)
    if starts is None or ends is None:
        return None
    normalized = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    if axis not in normalized:
        return _dim(node.inputs[0], axis, depth + 1)
    k = normalized.index(axis)
    width = _dim(node.inputs[0], axis, depth + 1)
    if width is None:
        return None
    return len(range(width)[slice(int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k]), int(steps.reshape(-1)[k]))])


def static_dim(value: ir.Value | None, axis: int) -> int | None:
    """Dim ``axis`` of ``value`` if it is a number, read from its shape or from the op that made it."""
    with _memo():
        return _dim(value, axis, 0)


def _dim(value: ir.Value | None, axis: int, depth: int) -> int | None:
    if value is None or value.shape is None or depth > _MAX_DEPTH:
        return None
    rank = len(value.shape)
    if not -rank <= axis < rank:
        return None
    axis %= rank
    dim = value.shape.dims[axis]
    if isinstance(dim, int):
        return dim
    memo = _STATE.memo
    if (value, axis) not in memo:
        memo[value, axis] = None  # a cycle through this dim (none in a DAG) or the depth limit: unknown
        memo[value, axis] = _dim_from_producer(value, axis, rank, depth)
    return memo[value, axis]


def _dim_from_producer(value: ir.Value, axis: int, rank: int, depth: int) -> int | None:
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return None
    op = node.op_type
    if op == "Reshape":
        return _reshaped_dim(node, axis, depth)
    if op == "Slice":
        return _sliced_dim(node, axis, rank, depth)
    if op == "Transpose":
        perm = _attr(node, "perm", None)
        return _dim(node.inputs[0], perm[axis], depth + 1) if perm is not None else None
    same_rank = node.inputs[0].shape is not None and len(node.inputs[0].shape) == rank
    if op in _SAME_SHAPE and same_rank:
        return _dim(node.inputs[0], axis, depth + 1)
    if op in _BINARY and len(node.inputs) == 2:
        return _broadcast_dim(node, axis, rank, depth)
    if op == "Split" and same_rank:
        return _split_dim(node, value, axis, rank, depth)
    if op == "Unsqueeze":
        return _unsqueezed_dim(node, axis, rank, depth)
    if op == "Expand" and len(node.inputs) == 2:
        return _expanded_dim(node, axis, rank, depth)
    if op == "GatherElements" and len(node.inputs) == 2:  # the output has the indices' shape
        return _dim(node.inputs[1], axis, depth + 1)
    if op == "Tile" and same_rank and len(node.inputs) == 2:  # GPT-J's position_ids.repeat(1, 1, width)
        repeat, dim = _entry(node.inputs[1], axis, depth + 1), _dim(node.inputs[0], axis, depth + 1)
        return None if repeat is None or dim is None else dim * repeat
    if op == "Concat" and all(x is not None and x.shape is not None and len(x.shape) == rank for x in node.inputs):
        if axis != _attr(node, "axis", 0) % rank:
            return next((d for x in node.inputs if (d := _dim(x, axis, depth + 1)) is not None), None)
        widths = [_dim(x, axis, depth + 1) for x in node.inputs]
        return sum(widths) if all(isinstance(w, int) for w in widths) else None
    return None


def _broadcast_dim(node: ir.Node, axis: int, rank: int, depth: int) -> int | None:
    """Numpy broadcasting, right-aligned: a known dim other than 1 is the result's; all known 1s give 1."""
    dims = []
    for x in node.inputs:
        if x is None or x.shape is None or len(x.shape) > rank:
            return None
        own = axis - (rank - len(x.shape))
        dims.append(1 if own < 0 else _dim(x, own, depth + 1))
    wide = [d for d in dims if isinstance(d, int) and d != 1]
    if wide:
        return wide[0]
    return 1 if all(d == 1 for d in dims) else None


def _entry(value: ir.Value | None, index: int, depth: int) -> int | None:
    """Entry ``index`` of a 1-D integer tensor, when it is known even if others are not (a Concat of pieces, one
    of them the batch read from a shape)."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
        at = index  # the entry's index within the piece that holds it
        for piece in node.inputs:
            length = piece.shape.dims[0] if piece is not None and piece.shape is not None and len(piece.shape) == 1 \
                else None
            if not isinstance(length, int):
                break  # a piece of unknown length: only the whole value can say
            if at < length:
                known = _value(piece, depth + 1)
                return None if known is None else int(known.reshape(-1)[at])
            at -= length
        else:
            return None
    known = _value(value, depth + 1)
    return None if known is None or index >= known.size else int(known.reshape(-1)[index])


def _expanded_dim(node: ir.Node, axis: int, rank: int, depth: int) -> int | None:
    """Expand broadcasts its input against the shape tensor, right-aligned: an entry other than 1 is the dim."""
    target = _value(node.inputs[1], depth + 1)
    x = node.inputs[0]
    if target is None or x.shape is None or len(x.shape) > rank or len(target.reshape(-1)) > rank:
        return None
    target = target.reshape(-1)
    at = axis - (rank - len(target))
    entry = int(target[at]) if at >= 0 else 1
    own = axis - (rank - len(x.shape))
    dim = 1 if own < 0 else _dim(x, own, depth + 1)
    if entry != 1:
        return entry if dim in (None, 1, entry) else None
    return dim


def _split_dim(node: ir.Node, value: ir.Value, axis: int, rank: int, depth: int) -> int | None:
    """A Split output keeps every dim but the split one, whose width the split sizes give."""
    if axis != _attr(node, "axis", 0) % rank:
        return _dim(node.inputs[0], axis, depth + 1)
    sizes = _value(node.inputs[1], depth + 1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is not None:
        return int(sizes.reshape(-1)[node.outputs.index(value)])
    width = _dim(node.inputs[0], axis, depth + 1)
    parts = len(node.outputs)
    return width // parts if isinstance(width, int) and width % parts == 0 else None


def _unsqueezed_dim(node: ir.Node, axis: int, rank: int, depth: int) -> int | None:
    """An inserted axis is 1; any other is the input's, counted without the inserted ones."""
    axes = _value(node.inputs[1], depth + 1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None:
        return None
    inserted = sorted(int(a) % rank for a in axes.reshape(-1))
    if axis in inserted:
        return 1
    return _dim(node.inputs[0], axis - sum(a < axis for a in inserted), depth + 1)

"""Proving that an exporter's Reshape/Expand chain is a transpose or a repeat_kv.

Both exporters move K's last two axes and repeat K/V heads with Reshape and
Expand nodes whose target shapes are computed at run time
(``Concat(Shape(k)[0:2], Shape(k)[3:4], ...)``). Whether such a chain *is*
``k.transpose(-1, -2)`` or ``repeat_kv(k, n)`` depends on which dims those
shape tensors hold, and onnx shape inference does not say: it gives the
merged dims fresh ``unk__`` names and loses every dim of a TorchScript
export. This module reads the shape arithmetic itself (Shape, Gather,
Slice, Concat, Unsqueeze, Squeeze, Cast, Reshape, Mul, Equal/Where,
ConstantOfShape of small constants) and names each element of a shape
tensor by what it is: an int, a symbolic dim name of the graph, or "dim
``axis`` of value ``x``". Two elements are the same dim when their names
are equal. Anything it cannot read makes the proof fail (the core is then
reported, not fused); it never guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["Dim", "dim_of", "effective_reshape", "elements", "product", "same_dims", "traced_dim", "traced_entry"]

# A dim is an int, a symbolic name (str), a (value, axis) pair for a dim known
# only by where it comes from, or a product ("*", coefficient, factors).
Dim = Any

_MAX_ELEMENTS = 16


def dim_of(value: ir.Value, axis: int) -> Dim:
    """The name of dim ``axis`` of ``value``."""
    shape = value.shape
    if shape is not None:
        if axis < 0:
            axis += len(shape)
        if 0 <= axis < len(shape):
            d = shape[axis]
            if isinstance(d, int):
                return d
            if d.value is not None:
                return d.value
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and axis >= 0:
        perm = node.attributes.get_ints("perm")
        if perm is not None and axis < len(perm):
            return dim_of(node.inputs[0], perm[axis])
    return (value, axis)


def product(a: Dim, b: Dim) -> Dim:
    """a * b, with ints folded and factors kept in a canonical order."""
    coef, factors = 1, []
    for x in (a, b):
        if isinstance(x, (int, np.integer)):
            coef *= int(x)
        elif isinstance(x, tuple) and x and x[0] == "*":
            coef *= x[1]
            factors.extend(x[2])
        else:
            factors.append(x)
    if not factors:
        return coef
    if coef == 1 and len(factors) == 1:
        return factors[0]
    return ("*", coef, tuple(sorted(factors, key=_order)))


def _order(x: Dim) -> str:
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], ir.Value):
        return f"{id(x[0])}:{x[1]}"
    return str(x)


def _const(value: ir.Value) -> list[Any] | None:
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size > _MAX_ELEMENTS:
        return None
    return [x.item() for x in np.asarray(tensor.numpy()).reshape(-1)]


def _int_attr(node: ir.Node, name: str, default: int | None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def elements(value: ir.Value | None, _depth: int = 0) -> list[Dim] | None:
    """The elements of a small 1-D (or scalar) integer tensor, named; None if unreadable."""
    if value is None or _depth > 24:
        return None
    const = _const(value)
    if const is not None:
        return const
    node = value.producer()
    if node is None:
        return None
    op, ins = node.op_type, node.inputs
    sub = lambda v: elements(v, _depth + 1)
    if op == "Shape":
        src = ins[0]
        rank = len(src.shape) if src.shape is not None else None
        start = _int_attr(node, "start", 0)
        end = _int_attr(node, "end", None)
        if rank is None:
            if start < 0 or end is None or end < 0:
                return None
            return [dim_of(src, i) for i in range(start, end)]
        return [dim_of(src, i) for i in range(rank)[slice(start, end)]]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        # On a shape tensor these change only its rank (0-D <-> 1-D), not its elements.
        return sub(ins[0])
    if op == "Concat":
        out: list[Dim] = []
        for x in ins:
            part = sub(x)
            if part is None:
                return None
            out.extend(part)
        return out
    if op == "Gather":
        data, idx = sub(ins[0]), _const(ins[1]) if len(ins) > 1 else None
        if data is None or idx is None or _int_attr(node, "axis", 0) != 0:
            return None
        try:
            return [data[i] for i in idx]
        except IndexError:
            return None
    if op == "Slice":
        data = sub(ins[0])
        params = [_const(x) if x is not None else None for x in ins[1:5]]
        if data is None or any(p is None for p in params[:2]):
            return None
        starts, ends = params[0], params[1]
        axes = params[2] if len(params) > 2 and params[2] is not None else [0]
        steps = params[3] if len(params) > 3 and params[3] is not None else [1]
        if len(starts) != 1 or axes not in ([0], [-1]):
            return None
        end = min(int(ends[0]), len(data)) if ends[0] >= 0 else ends[0]
        return data[slice(int(starts[0]), end, int(steps[0]))]
    if op == "ConstantOfShape":
        count = sub(ins[0])
        if count is None or len(count) != 1 or not isinstance(count[0], int):
            return None
        attr = node.attributes.get("value")
        fill = 0 if attr is None else np.asarray(attr.as_tensor().numpy()).reshape(-1)[0].item()
        return [fill] * count[0]
    if op in ("Mul", "Equal"):
        a, b = sub(ins[0]), sub(ins[1])
        if a is None or b is None:
            return None
        if len(a) == 1:
            a = a * len(b)
        if len(b) == 1:
            b = b * len(a)
        if len(a) != len(b):
            return None
        if op == "Mul":
            return [product(x, y) for x, y in zip(a, b)]
        return [_equal(x, y) for x, y in zip(a, b)]
    if op == "Where":
        cond, a, b = sub(ins[0]), sub(ins[1]), sub(ins[2])
        if cond is None or a is None or b is None:
            return None
        n = max(len(cond), len(a), len(b))
        cond, a, b = (x * n if len(x) == 1 else x for x in (cond, a, b))
        if not len(cond) == len(a) == len(b) == n or any(c is None for c in cond):
            return None
        return [x if c else y for c, x, y in zip(cond, a, b)]
    return None


def _equal(a: Dim, b: Dim) -> bool | None:
    """Whether two named dims are equal; None when it cannot be decided."""
    if a == b:
        return True
    if isinstance(a, (int, bool)) and isinstance(b, (int, bool)):
        return a == b
    # A dim is never negative: the -1 sentinel of torch's expand never equals one.
    if isinstance(a, int) and a < 0 or isinstance(b, int) and b < 0:
        return False
    return None


def effective_reshape(
    target: Sequence[Dim], input_dims: Sequence[Dim], allowzero: int
) -> list[Dim]:
    """Reshape's target with 0 entries replaced by the input dim they copy."""
    out = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero and i < len(input_dims):
            out.append(input_dims[i])
        else:
            out.append(d)
    return out


def same_dims(actual: Sequence[Dim], expected: Sequence[Dim]) -> bool:
    """Reshape target ``actual`` gives the shape ``expected`` (one -1 is inferred)."""
    if len(actual) != len(expected):
        return False
    wild = [i for i, d in enumerate(actual) if d == -1]
    if len(wild) > 1:
        return False
    return all(a == e for i, (a, e) in enumerate(zip(actual, expected)) if i not in wild)


# Ops whose output has the input's shape (first input), so a dim passes through.
_SAME_SHAPE = frozenset({"Cast", "Identity", "Neg", "Relu", "Softmax", "Tanh", "Sqrt", "Reciprocal", "Exp"})


def traced_dim(value: ir.Value, axis: int, _depth: int = 0) -> Dim:
    """The name of dim ``axis`` of ``value``, read from the shape arithmetic that made it.

    ``dim_of`` trusts the inferred shape; onnx shape inference names the dims
    of a TorchScript export's intermediate values with fresh ``unk__`` names
    that no Shape of an input ever gives. This reads the dim from the
    producer instead where it can (a Reshape's readable target, a Transpose,
    a Gather with a scalar index, a shape-preserving op), and falls back to
    ``dim_of`` only where the producer says nothing.
    """
    shape = value.shape
    rank = len(shape) if shape is not None else None
    if axis < 0 and rank is not None:
        axis += rank
    if axis < 0:
        return (value, axis)
    if shape is not None and axis < rank and isinstance(shape[axis], int):
        return shape[axis]
    node = value.producer()
    if node is not None and _depth < 16:
        found = _dim_from_producer(node, axis, _depth + 1)
        if found is not None:
            return found
    return dim_of(value, axis)


def traced_entry(d: Dim, _depth: int = 0) -> Dim:
    """A shape tensor's entry with each dim known only by where it is read (``Shape(x)[i]``) traced.

    ``elements`` names ``Shape(x)[i]`` by x's inferred shape, or as the pair
    (x, i) when that says nothing; tracing the pair names it as
    :func:`traced_dim` names the dims of the tensors the target is compared
    with (a Reshape target read from a later layer's hidden state, whose
    inferred dims are unknown, against Q's dims traced through the
    projection that made it).
    """
    if isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], ir.Value):
        return traced_dim(d[0], d[1], _depth)
    if isinstance(d, tuple) and d and d[0] == "*":
        named: Dim = d[1]
        for factor in d[2]:
            named = product(named, traced_entry(factor, _depth))
        return named
    return d


def _dim_from_producer(node: ir.Node, axis: int, depth: int) -> Dim | None:
    op, ins = node.op_type, node.inputs
    if op == "Transpose":
        perm = node.attributes.get_ints("perm")
        if perm is not None and axis < len(perm):
            return traced_dim(ins[0], perm[axis], depth)
        return None
    if op == "Reshape":
        target = elements(ins[1])
        if target is None or axis >= len(target):
            return None
        d = target[axis]
        if d == 0 and not _int_attr(node, "allowzero", 0):
            return traced_dim(ins[0], axis, depth)
        return None if d in (0, -1) else traced_entry(d, depth)
    if op == "Gather":
        index = ins[1]
        data_rank = len(ins[0].shape) if ins[0].shape is not None else None
        if _rank_of(index) != 0 or data_rank is None:
            return None
        gather_axis = _int_attr(node, "axis", 0)
        gather_axis += data_rank if gather_axis < 0 else 0
        return traced_dim(ins[0], axis if axis < gather_axis else axis + 1, depth)
    if op in _SAME_SHAPE:
        return traced_dim(ins[0], axis, depth)
    if op == "Concat" and ins:
        # Off the concat axis every operand has the dim. It is read from the first operand a node
        # computes: a cache's Concat(past, new) then names it as the chunk's own shape arithmetic does
        # (the query's, the Reshape targets'), not as the past input declares it.
        concat_axis = _int_attr(node, "axis", 0)
        rank = len(ins[0].shape) if ins[0] is not None and ins[0].shape is not None else None
        if rank is not None and concat_axis < 0:
            concat_axis += rank
        computed = [x for x in ins if x is not None and x.producer() is not None]
        if concat_axis >= 0 and axis != concat_axis and computed:
            return traced_dim(computed[0], axis, depth)
        return None
    if op in ("Add", "Sub", "Mul", "Div") and len(ins) == 2:
        # A scalar operand broadcasts away: the dims are the other operand's.
        for x, other in ((ins[0], ins[1]), (ins[1], ins[0])):
            if _is_scalar(other) and (_rank_of(other) == 0 or x.shape is not None and len(x.shape) >= _rank_of(other)):
                return traced_dim(x, axis, depth)
        # So does an operand of lower rank on the leading axes it does not reach (a projection's bias).
        for x, other in ((ins[0], ins[1]), (ins[1], ins[0])):
            if x.shape is not None and axis < len(x.shape) - _rank_of(other):
                return traced_dim(x, axis, depth)
    if op == "MatMul" and len(ins) == 2 and ins[0].shape is not None and axis < len(ins[0].shape) - 1:
        # x [..., K] @ W [K, N] with a 2-D W: the leading dims are x's.
        if _rank_of(ins[1]) == 2:
            return traced_dim(ins[0], axis, depth)
    return None


def _is_scalar(value: ir.Value) -> bool:
    """One element: by its shape, or by its constant value."""
    if value.shape is not None:
        return all(d == 1 for d in value.shape)
    tensor = ir.convenience.get_const_tensor(value)
    return tensor is not None and tensor.size == 1


def _rank_of(value: ir.Value) -> int:
    if value.shape is not None:
        return len(value.shape)
    tensor = ir.convenience.get_const_tensor(value)
    return len(tensor.shape) if tensor is not None else 99

"""Walking back from an attention core's MatMul inputs to the canonical Q, K, V.

The core pattern (``attention.py``) ends at ``MatMul(q', kt')`` and
``MatMul(p, v')``; what lies before them differs by exporter: scalar scales
on Q and K, K transposed directly or through Reshape/Transpose/Reshape, and
repeat_kv (Unsqueeze -> Expand -> Reshape) in front of K and V. Each helper
here peels one such layer, proving it with ``attention_dims``, and returns a
reason string when a chain looks like one of these but is not provably so.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from qgraph_passes.attention_dims import (
    dim_of,
    effective_reshape,
    elements,
    product,
    same_dims,
)
from qgraph_passes.shape_values import static_value

__all__ = ["Peeled", "peel_key_transpose", "peel_repeat_kv", "peel_scale", "scalar_constant"]


@dataclasses.dataclass
class Peeled:
    value: ir.Value
    scale: float = 1.0
    n_rep: int = 1
    key_format: str = "BHSD"


def scalar_constant(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, or of one computed from constants and static dims, else None.

    SDPA exported without an explicit scale computes it from the query's head size at run time
    (``Sqrt(1 / Sqrt(Cast(Shape(q)[-1:])))`` on q and on k: GPT-2 through optimum); when that size is a
    number in the graph, the scale is one too (:func:`qgraph_passes.shape_values.static_value`).
    """
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    # only a value declared to hold one number is evaluated: anything else (q, k: whole activations) would send
    # static_value up the whole graph above it, once per Mul the scale walk meets
    one = value.shape is not None and all(isinstance(d, int) for d in value.shape) and int(np.prod(value.shape)) == 1
    array = np.asarray(tensor.numpy()) if tensor is not None else static_value(value) if one else None
    if array is None or array.size != 1:
        return None
    return float(array.reshape(-1)[0])


def peel_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """Strip Mul/Div by scalar constants: (inner value, product of factors).

    Other users of the scaled value keep it; the fused node reads the
    inner value and carries the factor in its ``scale``.
    """
    scale = 1.0
    while (node := value.producer()) is not None and node.op_type in ("Mul", "Div"):
        a, b = node.inputs[0], node.inputs[1]
        cb = scalar_constant(b)
        if node.op_type == "Mul":
            ca = scalar_constant(a)
            if cb is not None and ca is None:
                value, scale = a, scale * cb
            elif ca is not None and cb is None:
                value, scale = b, scale * ca
            else:
                break
        elif cb is not None and cb != 0.0:
            value, scale = a, scale / cb
        else:
            break
    return value, scale


def _reshape_parts(node: ir.Node) -> tuple[ir.Value, list, int] | str:
    target = elements(node.inputs[1])
    if target is None:
        return f"cannot read the target shape of Reshape '{node.name}'"
    allowzero = node.attributes.get_int("allowzero", 0)
    return node.inputs[0], target, allowzero


def peel_repeat_kv(value: ir.Value) -> tuple[ir.Value, int] | str | None:
    """``Reshape(Expand(Unsqueeze(x, 2), e), r)`` = repeat_kv(x, n): (x, n), a reason, or None.

    None means the value is not produced that way at all (no repeat); a
    string means it looks like a repeat but one of the checks failed.
    """
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = reshape.inputs[0].producer()
    if expand is None or expand.op_type != "Expand":
        return None
    unsqueeze = expand.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    axes = elements(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else unsqueeze.attributes.get_ints("axes")
    x = unsqueeze.inputs[0]
    e = elements(expand.inputs[1])
    if e is None or len(e) != 5:
        return f"cannot read a 5-D target shape of Expand '{expand.name}' (repeat_kv)"
    if axes is None or list(axes) not in ([2], [-3]):
        return f"Unsqueeze '{unsqueeze.name}' before Expand is not on axis 2 (repeat_kv)"
    kd = [dim_of(x, i) for i in range(4)]
    n = e[2]
    if not isinstance(n, int) or n < 1:
        return f"repeat count of Expand '{expand.name}' is not a constant ({n!r})"
    for j, want in zip((0, 1, 3, 4), kd):
        if e[j] not in (1, want):
            return f"Expand '{expand.name}' changes dim {j} (repeat_kv must only repeat heads)"
    parts = _reshape_parts(reshape)
    if isinstance(parts, str):
        return parts
    _, target, allowzero = parts
    expanded = [kd[0], kd[1], n, kd[2], kd[3]]
    eff = effective_reshape(target, expanded, allowzero)
    if not same_dims(eff, [kd[0], product(kd[1], n), kd[2], kd[3]]):
        return f"Reshape '{reshape.name}' does not merge the kv-head and repeat axes (repeat_kv)"
    return x, n


def peel_key_transpose(kt: ir.Value) -> Peeled | str:
    """K^T [B, H, D, T] back to K: Transpose(0,1,3,2), Reshape/Transpose(0,2,1)/Reshape, or BSHD."""
    node = kt.producer()
    if node is None:
        return f"the key operand '{kt.name}' of the scores MatMul is not a transposed key"
    if node.op_type == "Transpose":
        perm = list(node.attributes.get_ints("perm") or [])
        if perm == [0, 1, 3, 2]:
            return Peeled(node.inputs[0])
        if perm == [0, 2, 3, 1]:
            return Peeled(node.inputs[0], key_format="BSHD")
        return f"Transpose '{node.name}' on the key has perm {perm}, not a transpose of its last two axes"
    if node.op_type == "Reshape":
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type != "Transpose" or list(inner.attributes.get_ints("perm") or []) != [0, 2, 1]:
            return f"Reshape '{node.name}' on the key is not Reshape(Transpose(0,2,1)(Reshape(k)))"
        first = inner.inputs[0].producer()
        if first is None or first.op_type != "Reshape":
            return f"Transpose '{inner.name}' on the key does not read a Reshape"
        parts_in = _reshape_parts(first)
        parts_out = _reshape_parts(node)
        if isinstance(parts_in, str):
            return parts_in
        if isinstance(parts_out, str):
            return parts_out
        k, target_in, zero_in = parts_in
        kd = [dim_of(k, i) for i in range(4)]
        if k.shape is not None and len(k.shape) != 4:
            return f"key '{k.name}' is not 4-D"
        merged = effective_reshape(target_in, kd, zero_in)
        if len(merged) != 3 or not same_dims(merged[1:], kd[2:]) or merged[0] not in (-1, product(kd[0], kd[1])):
            return f"Reshape '{first.name}' does not merge the key's batch and head axes"
        transposed = [merged[0], kd[3], kd[2]]
        out = effective_reshape(target_out := parts_out[1], transposed, parts_out[2])
        if not same_dims(out, [kd[0], kd[1], kd[3], kd[2]]):
            return f"Reshape '{node.name}' does not split the key back into [B, H, D, T] ({target_out!r})"
        return Peeled(k)
    if node.op_type in ("Mul", "Div"):  # peel_scale stopped here: the factor is not a number in the graph
        return (f"the key is scaled by {node.op_type} '{node.name}', whose factor is neither a constant nor computed "
                "from constants and static dims")
    return f"the key operand of the scores MatMul comes from {node.op_type} '{node.name}', not a transpose"

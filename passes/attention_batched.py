"""Proofs for attention written on batched heads: 3-D [B*H, S, D] tensors (BLOOM's baddbmm/bmm).

BLOOM reshapes Q, K, V from [B, H, S, D] to [B*H, S, D], multiplies with
``baddbmm``/``bmm``, views the scores as [B, H, S, T] for the mask and
Softmax, and the probabilities back to [B*H, S, T] for the product with V.
The fused Attention is 4-D, so each of those Reshapes must provably merge
(or split) exactly the batch and head axes, in that order -- a Reshape that
mixes heads with positions (or takes H before B) is not attention over
heads. Each predicate here proves one Reshape from the shape arithmetic
(``attention_dims.traced_dim``) and returns a reason when it cannot.
"""

from __future__ import annotations

import onnx_ir as ir
from qgraph_passes.attention_dims import Dim, effective_reshape, elements, product, same_dims, traced_dim, traced_entry
from qgraph_passes.attention_operands import peel_scale

__all__ = ["dims4", "key_of_transposed", "merges_batch_and_heads", "pins_element_count", "splits_batch_and_heads", "unmerge_heads"]


def dims4(value: ir.Value) -> list[Dim]:
    return [traced_dim(value, i) for i in range(4)]


def _target(reshape: ir.Node) -> tuple[list[Dim], int] | str:
    target = elements(reshape.inputs[1])
    if target is None:
        return f"cannot read the target shape of Reshape '{reshape.name}'"
    return [traced_entry(d) for d in target], reshape.attributes.get_int("allowzero", 0)


def unmerge_heads(value: ir.Value, what: str) -> ir.Value | str:
    """``value`` [B*H, S, D] back to the [B, H, S, D] tensor it is a Reshape of, or why not."""
    node = value.producer()
    if node is None or node.op_type != "Reshape":
        producer = "a graph input" if node is None else f"{node.op_type} '{node.name}'"
        return f"the 3-D {what} '{value.name}' comes from {producer}, not a Reshape of a 4-D tensor"
    source = node.inputs[0]
    if source.shape is None or len(source.shape) != 4:
        return f"Reshape '{node.name}' of the {what} does not read a 4-D tensor"
    parts = _target(node)
    if isinstance(parts, str):
        return parts
    target, allowzero = parts
    d = dims4(source)
    merged = effective_reshape(target, d, allowzero)
    if not same_dims(merged, [product(d[0], d[1]), d[2], d[3]]):
        return f"Reshape '{node.name}' does not merge the batch and head axes of the {what} ({target!r} of {d!r})"
    return source


def key_of_transposed(kt: ir.Value) -> tuple[ir.Value, float] | str:
    """K [B, H, T, D] and the scale on the way, from K^T = Transpose(0,2,1)(Reshape(K) [B*H, T, D])."""
    node = kt.producer()
    if node is None or node.op_type != "Transpose" or list(node.attributes.get_ints("perm") or []) != [0, 2, 1]:
        what = "a graph input" if node is None else f"{node.op_type} '{node.name}'"
        return f"the 3-D key operand '{kt.name}' comes from {what}, not Transpose(0,2,1) of a 3-D key"
    k3, scale = peel_scale(node.inputs[0])
    key = unmerge_heads(k3, "key")
    return key if isinstance(key, str) else (key, scale)


def splits_batch_and_heads(reshape: ir.Node, batch: Dim, heads: Dim, rows: Dim, cols: Dim) -> str | None:
    """None when ``reshape`` turns [B*H, rows, cols] into [B, H, rows, cols]; else why not."""
    parts = _target(reshape)
    if isinstance(parts, str):
        return parts
    target, allowzero = parts
    split = effective_reshape(target, [product(batch, heads), rows, cols], allowzero)
    if not same_dims(split, [batch, heads, rows, cols]):
        return (f"Reshape '{reshape.name}' does not split the scores' first axis into batch and heads "
                f"({target!r}, expected {[batch, heads, rows, cols]!r})")
    return None


def merges_batch_and_heads(reshape: ir.Node, batch: Dim, heads: Dim, rows: Dim, cols: Dim) -> str | None:
    """None when ``reshape`` turns [B, H, rows, cols] into [B*H, rows, cols]; else why not."""
    parts = _target(reshape)
    if isinstance(parts, str):
        return parts
    target, allowzero = parts
    merged = effective_reshape(target, [batch, heads, rows, cols], allowzero)
    if not same_dims(merged, [product(batch, heads), rows, cols]):
        return (f"Reshape '{reshape.name}' does not merge the probabilities' batch and head axes "
                f"({target!r}, expected {[product(batch, heads), rows, cols]!r})")
    return None


def pins_element_count(probs_view: ir.Node) -> bool:
    """The probabilities' view to [B*H, S, T] has no -1 except on T.

    Its B*H and S are proven (``merges_batch_and_heads``) and MatMul with V
    [B*H, T, D] needs the last dim to be T, so every run that does not fail
    has exactly B*H*S*T scores: nothing upstream stretched them by broadcasting.
    """
    target = elements(probs_view.inputs[1])
    return target is not None and len(target) == 3 and -1 not in target[:2]

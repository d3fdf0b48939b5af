"""Position biases (ALiBi) added to attention scores, folded into the fused Attention's mask.

BLOOM adds ``slope_h * position`` to the scores of head h (``alibi.baddbmm``)
before the exporter's causal/padding mask. ``Attention`` has no bias input,
but ``softmax(scale * QK^T + bias + mask)`` only needs ``bias + mask``: the
bias joins the mask input. Two things decide whether that is allowed:

* the bias is a *position* bias: it reads nothing but the attention mask
  (the graph inputs the exporter's mask reads) and shapes -- never token
  data (ids, hidden states, Q/K/V). ``reads_only_mask_and_shapes`` walks its
  producers; a Shape/Size reads only the shape of its input. The kv-cache
  pass can then rebuild it from positions, as it rebuilds the mask; the
  fused node says so in ``MASK_BIAS_KEY``.
* its place relative to the scale: ``Attention`` scales QK^T only, so a
  bias added *before* the scores' scale is multiplied by that scale.

How the bias and the exporter's mask combine (``to_batched_attention``):
``safe(bias4 * factor + additive(mask))`` in Q's dtype, where ``additive``
is the mask as ``attention_masks`` makes it safe for onnxruntime (a boolean
``Where(keep, scores, fill)`` becomes ``Where(keep, 0, fill)``, a
``finfo.min`` fill becomes ``finfo.min / 2``) and ``safe`` clamps finite
values to ``finfo.min / 2`` (``-inf`` kept): a fully masked row stays
uniform (finite fill) or zero (``-inf``), since a bias of ordinary size
vanishes next to the fill -- and a "bias" that itself holds a masking fill
keeps its meaning too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.attention_dims import Dim, product, traced_dim

__all__ = ["MASK_BIAS_KEY", "bias_as_4d", "bias_broadcasts", "data_sources", "reads_only_mask_and_shapes"]

#: Metadata of a fused Attention whose mask input carries a position bias.
MASK_BIAS_KEY = "qgraph.mask_bias"
POSITION = "position"

_SHAPE_ONLY = frozenset({"Shape", "Size"})
_WALK_LIMIT = 4096


def data_sources(values: list[ir.Value]) -> set[ir.Value] | None:
    """The graph inputs whose *values* ``values`` are computed from; None if the walk is too long.

    Initializers and constants are not sources; Shape/Size read only a shape.
    """
    stack, seen, found = list(values), set(), set()
    while stack:
        value = stack.pop()
        if value is None or value in seen:
            continue
        seen.add(value)
        if len(seen) > _WALK_LIMIT:
            return None
        node = value.producer()
        if node is None:
            if not value.is_initializer() and value.const_value is None:
                found.add(value)
            continue
        if node.op_type in _SHAPE_ONLY:
            continue
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            return None  # a subgraph may read outer values; do not guess
        stack.extend(node.inputs)
    return found


def reads_only_mask_and_shapes(bias: ir.Value, mask: ir.Value | None) -> str | None:
    """None when ``bias`` reads only what the exporter's ``mask`` reads (and shapes); else why not."""
    bias_sources = data_sources([bias])
    if bias_sources is None:
        return f"cannot tell what the score bias '{bias.name}' is computed from"
    mask_sources = data_sources([mask]) if mask is not None else set()
    if mask_sources is None:
        return f"cannot tell what the mask '{mask.name}' is computed from"
    floats = sorted(v.name for v in bias_sources if v.dtype is not None and v.dtype.is_floating_point())
    if floats:
        return f"the score bias '{bias.name}' reads float data ({', '.join(floats)}), not only the mask and shapes"
    other = sorted(v.name for v in bias_sources - mask_sources)
    if other:
        return (f"the score bias '{bias.name}' reads {', '.join(other)}, which the attention mask does not read "
                "(a position bias reads only the mask and shapes)")
    return None


def _above_one(d: Dim) -> bool:
    """Provably more than 1: a broadcast cannot stretch such a dim, only fail on it."""
    if isinstance(d, int):
        return d > 1
    return isinstance(d, tuple) and len(d) == 3 and d[0] == "*" and d[1] > 1


def bias_broadcasts(bias: ir.Value, scores_dims: list[Dim], count_pinned: bool = False,
                    keys_contracted: bool = False) -> str | None:
    """None when adding ``bias`` keeps the scores' shape (or fails in both graphs).

    Each dim of the bias is 1 or the scores' own, or the scores' dim is
    provably above 1 (then the Add keeps it or fails; it never stretches it).
    ``count_pinned``: the graph later proves the scores hold exactly
    B*H*S*T elements (a view and the product with V fix every dim), so
    any stretching broadcast fails in the original graph anyway.
    ``keys_contracted``: the scores' last dim is contracted with V's keys
    right after the Softmax, so stretching it fails in the original too.
    """
    if bias.shape is None:
        return f"rank of the score bias '{bias.name}' is unknown"
    rank = len(bias.shape)
    if rank > len(scores_dims):
        return f"the score bias '{bias.name}' is {rank}-D, more than the {len(scores_dims)}-D scores"
    if count_pinned:
        return None
    for axis in range(rank - 1 if keys_contracted else rank):
        d = traced_dim(bias, axis)
        want = scores_dims[len(scores_dims) - rank + axis]
        if d != 1 and d != want and not _above_one(want):
            return f"cannot prove dim {axis} of the score bias '{bias.name}' ({d!r}) is 1 or the scores' ({want!r})"
    return None


def bias_as_4d(op, bias: ir.Value, query: ir.Value) -> ir.Value:
    """A bias broadcastable to 3-D [B*H, S, T] scores, as one broadcastable to [B, H, S, T].

    Ranks below 3 broadcast the same way against both. A 3-D bias splits its
    first dim into (B, H) -- after an Expand when that dim is not provably
    already B*H (it may be 1).
    """
    if bias.shape is None or len(bias.shape) < 3:
        return bias
    batch_heads = product(traced_dim(query, 0), traced_dim(query, 1))
    first = traced_dim(bias, 0)
    if first == 1:
        return op.Unsqueeze(bias, np.array([0], np.int64))
    if first != batch_heads:
        merged = op.Mul(op.Shape(query, start=0, end=1), op.Shape(query, start=1, end=2))
        bias = op.Expand(bias, op.Concat(merged, np.ones(2, np.int64), axis=0))
    return op.Reshape(bias, op.Concat(op.Shape(query, start=0, end=2), op.Shape(bias, start=1, end=3), axis=0))

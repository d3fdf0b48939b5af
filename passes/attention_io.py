"""Attention in onnxruntime's cheapest layout: the cache inputs inside it, heads packed in the last axis.

After ``kv-cache`` (concat style) each layer computes::

    q = Transpose(Reshape(q3, [B, S, Hq, D]), [0, 2, 1, 3])            # and k, v likewise; q, k maybe rotated
    present_k = Concat(past_k, k, axis=2);  present_v = Concat(past_v, v, axis=2)
    y = Attention(q, present_k, present_v, mask)
    out = Reshape(Transpose(y, [0, 2, 1, 3]), [B, S, Hq * D])

``Attention`` (opset 23) takes all of that itself: past K/V as inputs 4 and
5 (its present outputs are exactly the concatenations along the sequence
axis), and Q/K/V as ``[B, S, H * D]`` with ``q_num_heads`` /
``kv_num_heads`` (it splits the heads the same way the Reshape did, and
gives its output back merged). ``RotaryEmbedding`` likewise rotates
``[B, S, H * D]`` given ``num_heads``: it splits the last axis into
``[H, D]`` first, and ``interleaved`` (which channels pair up) and
``rotary_embedding_dim`` (how many of them turn) act within each head's
``D`` channels, so they carry over as they are (GPT-J's partial,
interleaved rotation as well as a whole half-rotation). Four rules, each exact::

    Attention(q, Concat(pk, k), Concat(pv, v), m)          -> Attention(q, k, v, m, pk, pv)  (+ present outputs)
    Transpose(RMSNormalization(Reshape(x3, [B, S, H, D]))) -> heads(Reshape(RMSNormalization(...), [0, 0, H * D]))
    RotaryEmbedding(heads(x3), c, s)                       -> heads(RotaryEmbedding(x3, c, s, num_heads=H))
    merge(Attention(heads(q3), heads(k3), heads(v3), ...)) -> Attention(q3, k3, v3, ..., q_num_heads, kv_num_heads)

where ``heads(x3) = Transpose(Reshape(x3, [B, S, H, D]), [0, 2, 1, 3])``
and ``merge`` is its inverse (a merge straight into rows, ``[-1, H * D]``
as GPT-2's Conv1D writes it, keeps its Reshape after the packed
Attention, and so does a merge whose target is not proven ``[B, S, H * D]``
but reads the packed output alike: :mod:`qgraph_passes.packed_merge`).
The second moves a norm of each head (Qwen3 normalizes q and k per head
before moving the heads) onto a view of its own, so the
projection the heads come from is the norm's output merged. A layer then
runs 2 rotations and 1 attention instead of 14 nodes (6 transposes, 4
reshapes, 2 concats). A Reshape counts as ``heads`` only when shape
inference shows it keeps x3's first two dims and splits the last into two
known ones; anything else is kept, and named in the report notes with the
check that failed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.packed_merge import packed_merge_reason
from qgraph_passes.projection_heads import read_heads_from_projections

from qgraph import RewritePass, Rule, RuleSet

__all__ = ["AttentionIOPass", "RULES"]

_HEADS = [0, 2, 1, 3]
_ATTRIBUTES = ("scale", "is_causal", "softcap", "qk_matmul_output_mode", "q_num_heads", "kv_num_heads")


def _heads(op, x3, shape):
    return op.Transpose(op.Reshape(x3, shape, allowzero=op.capture(f"{shape.name}_allowzero")), perm=_HEADS)


def _attention_node(match) -> ir.Node:
    return next(n for n in match.nodes if n.op_type == "Attention")


def _attention_attributes(node: ir.Node) -> dict:
    return {name: node.attributes[name].value for name in _ATTRIBUTES if name in node.attributes}


# -- rule 1: the cache concatenations into Attention -------------------------------


def cache_concat(op, q, k, v, mask, past_k, past_v):
    present_k = op.Concat(past_k, k, axis=2)
    present_v = op.Concat(past_v, v, axis=2)
    return op.Attention(q, present_k, present_v, mask), present_k, present_v


def check_cache_concat(match, q, k, past_k) -> str | None:
    node = _attention_node(match)
    if len(node.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return f"Attention '{node.name}' already has present or qk outputs in use"
    if "is_causal" in node.attributes and node.attributes["is_causal"].value:
        # where the causal diagonal sits once the keys come in two parts is not a question to leave
        # to a kernel: only an explicit mask (what kv-cache writes) is moved
        return f"Attention '{node.name}' is is_causal, not masked explicitly"
    for value in (q, k, past_k):
        if value.shape is None or len(value.shape) != 4:
            return f"'{value.name}' is not known to be 4-D (the concat axis 2 must be the sequence axis)"
    match["attributes"] = _attention_attributes(node)
    return None


def with_cache_inputs(op, q, k, v, mask, past_k, past_v, attributes):
    y, present_k, present_v = op.Attention(q, k, v, mask, past_k, past_v, _outputs=3, **attributes)
    return y, present_k, present_v


# -- rule 2: a norm of each head (Qwen3's q/k norm) between the split and the transpose --


def heads_normalized(op, x3, x_shape, scale):
    split = op.Reshape(x3, x_shape, allowzero=op.capture("x_shape_allowzero"))
    normed = op.RMSNormalization(split, scale, epsilon=op.capture("epsilon"), axis=op.capture("axis"),
                                 stash_type=op.capture("stash_type"))
    return op.Transpose(normed, perm=_HEADS)


def check_heads_normalized(match, x3, x_shape, axis) -> str | None:
    if axis not in (-1, 3):
        return f"the norm runs from axis {axis} on, not over each head's last axis"
    reshaped = _reshaped(match, x3, "x_shape")
    reason = _split_heads_reason(x3, reshaped)
    if reason:
        return reason
    match["heads_shape"] = reshaped.shape
    match["packed"] = np.array([0, 0, x3.shape[2]], np.int64)
    return None


def normalize_then_heads(op, x3, x_shape, scale, x_shape_allowzero, epsilon, axis, stash_type, heads_shape, packed):
    """The norm stays on the [B, S, H, D] view; its output merged back to [B, S, H*D] is what the heads come
    from, so the rules below see heads(y3) and pack them like any other projection."""
    split = op.Reshape(x3, x_shape, allowzero=x_shape_allowzero)
    split.shape = heads_shape
    normed = op.RMSNormalization(split, scale, epsilon=epsilon, axis=axis, stash_type=stash_type)
    normed.shape = heads_shape
    merged = op.Reshape(normed, op.Constant(value_ints=[int(v) for v in packed]), allowzero=0)
    merged.shape = x3.shape
    again = op.Reshape(merged, x_shape, allowzero=x_shape_allowzero)
    again.shape = heads_shape
    return op.Transpose(again, perm=_HEADS)


# -- rule 3: rotate before splitting the heads ---------------------------------------


def _split_heads_reason(x3: ir.Value, heads: ir.Value) -> str | None:
    """Why ``Reshape(x3) -> heads`` (its [B, S, H, D] output) is not the split of x3's last axis, if it is not."""
    if x3.shape is None or heads.shape is None or len(x3.shape) != 3 or len(heads.shape) != 4:
        return f"'{x3.name}' -> '{heads.name}' is not known to be [B, S, H*D] -> [B, S, H, D]"
    h, d, last = heads.shape[2], heads.shape[3], x3.shape[2]
    if not (isinstance(h, int) and isinstance(d, int) and isinstance(last, int)) or h * d != last:
        return f"'{heads.name}' splits {last} into {h} x {d}"
    for i in (0, 1):
        a, b = x3.shape[i], heads.shape[i]
        same = a == b if isinstance(a, int) or isinstance(b, int) else (a.value is not None and a.value == b.value)
        if not same:
            return f"dim {i} of '{heads.name}' ({b}) is not known to be dim {i} of '{x3.name}' ({a})"
    return None


def _reshaped(match, x3: ir.Value, shape_name: str) -> ir.Value:
    """The Reshape output read by the Transpose whose shape input is bound as ``shape_name``."""
    shape = match[shape_name]
    return next(n.outputs[0] for n in match.nodes if n.op_type == "Reshape" and n.inputs[1] is shape and n.inputs[0] is x3)


def rotary_of_heads(op, x3, x_shape, cos, sin):
    return op.RotaryEmbedding(_heads(op, x3, x_shape), cos, sin, interleaved=op.capture("interleaved"))


def check_rotary_of_heads(match, x3, x_shape) -> str | None:
    node = next(n for n in match.nodes if n.op_type == "RotaryEmbedding")
    if "num_heads" in node.attributes and node.attributes["num_heads"].value:
        return f"RotaryEmbedding '{node.name}' already reads packed heads"
    reshaped = _reshaped(match, x3, "x_shape")
    reason = _split_heads_reason(x3, reshaped)
    if reason:
        return reason
    match["num_heads"] = reshaped.shape[2]
    match["heads_shape"] = reshaped.shape
    match["rotary_dim"] = node.attributes["rotary_embedding_dim"].value if "rotary_embedding_dim" in node.attributes else 0
    return None


def rotate_then_split(op, x3, x_shape, cos, sin, num_heads, rotary_dim, interleaved, x_shape_allowzero, heads_shape):
    # interleaved and rotary_embedding_dim pair and pick channels within each head's last axis, which
    # the packed form splits off first (num_heads): they mean the same on either layout
    extra = {"rotary_embedding_dim": rotary_dim} if rotary_dim else {}
    if interleaved:
        extra["interleaved"] = interleaved
    rotated = op.RotaryEmbedding(x3, cos, sin, num_heads=num_heads, **extra)
    rotated.shape = x3.shape
    reshaped = op.Reshape(rotated, x_shape, allowzero=x_shape_allowzero)
    reshaped.shape = heads_shape  # what the Reshape of x3 gave: a shape tensor computed at run time is not read
    return op.Transpose(reshaped, perm=_HEADS)


# -- rule 4: Attention on packed heads ------------------------------------------------


def attention_of_heads(op, q3, k3, v3, q_shape, k_shape, v_shape, out_shape, mask, past_k, past_v):
    y, present_k, present_v = op.Attention(_heads(op, q3, q_shape), _heads(op, k3, k_shape), _heads(op, v3, v_shape),
                                           mask, past_k, past_v, _outputs=3)
    merged = op.Reshape(op.Transpose(y, perm=_HEADS), out_shape, allowzero=op.capture("out_allowzero"))
    return merged, present_k, present_v


def check_attention_of_heads(match, q3, k3, v3) -> str | None:
    node = _attention_node(match)
    if len(node.outputs) > 3 and (node.outputs[3].uses() or node.outputs[3].is_graph_output()):
        return f"Attention '{node.name}' has its qk_matmul_output in use"
    for x3, name in ((q3, "q_shape"), (k3, "k_shape"), (v3, "v_shape")):
        reason = _split_heads_reason(x3, _reshaped(match, x3, name))
        if reason:
            return reason
    merged = next(n for n in match.nodes if n.op_type == "Reshape" and n.inputs[1] is match["out_shape"]).outputs[0]
    heads = _reshaped(match, q3, "q_shape")
    # GPT-2's Conv1D merges the heads straight into the rows of its Gemm: [-1, H*D], which the packed output
    # [B, S, H*D] gives with the same Reshape
    match["flat"] = _flattened(match["out_shape"], heads)
    reason = None if match["flat"] else _split_heads_reason(merged, heads)  # merging is the inverse split
    if reason:
        # not proven [B, S, H*D]: the merge's Reshape stays, reading the packed output (qgraph_passes.packed_merge)
        kept = packed_merge_reason(node.graph, match["out_shape"], match["out_allowzero"])
        if kept:
            return f"the output merge: {reason}, and it cannot stay after the packed output: {kept}"
        match["flat"] = True
    attributes = _attention_attributes(node)
    attributes["q_num_heads"] = _reshaped(match, q3, "q_shape").shape[2]
    attributes["kv_num_heads"] = _reshaped(match, k3, "k_shape").shape[2]
    match["attributes"] = attributes
    return None


def _flattened(out_shape: ir.Value, heads: ir.Value) -> bool:
    """Whether the merge's target is the constant [-1, H*D] of the heads' [B, S, H, D]."""
    target = ir.convenience.get_const_tensor(out_shape)
    if target is None or heads.shape is None or len(heads.shape) != 4:
        return False
    h, d = heads.shape[2], heads.shape[3]
    return isinstance(h, int) and isinstance(d, int) and target.numpy().tolist() == [-1, h * d]


def on_packed_heads(op, q3, k3, v3, mask, past_k, past_v, out_shape, out_allowzero, attributes, flat):
    y, present_k, present_v = op.Attention(q3, k3, v3, mask, past_k, past_v, _outputs=3, **attributes)
    if flat:
        y = op.Reshape(y, out_shape, allowzero=out_allowzero)
    return y, present_k, present_v


_B, _S, _F = "B", "S", ir.DataType.FLOAT
# An additive mask over past + new keys, so its last dim is the total length the Attention checks.
_MASK = {"mask_past": (_F, (_B, 1, _S, "P")), "mask_new": (_F, (_B, 1, _S, _S))}
_MASK_VALUE = {"mask": lambda op, mask_past, mask_new: op.Concat(mask_past, mask_new, axis=-1)}
_PAST = {"past_k": (_F, (_B, 2, "P", 4)), "past_v": (_F, (_B, 2, "P", 4))}


def _shape(*dims):
    return np.array(dims, np.int64)


RULES = RuleSet(
    [
        Rule("attention-cache-inputs", cache_concat, with_cache_inputs, check_cache_concat,
             doc="Attention(q, Concat(pk, k), Concat(pv, v), m) -> Attention(q, k, v, m, pk, pv) with its present outputs",
             example_inputs={"q": (_F, (_B, 4, _S, 4)), "k": (_F, (_B, 2, _S, 4)), "v": (_F, (_B, 2, _S, 4)),
                             **_PAST, **_MASK}, example_values=_MASK_VALUE),
        Rule("normalized-heads", heads_normalized, normalize_then_heads, check_heads_normalized,
             doc="Transpose(RMSNormalization(Reshape(x3, [B, S, H, D]))) -> heads(Reshape(RMSNormalization(...), "
                 "[0, 0, H*D])): a per-head norm (Qwen3's q/k norm) no longer stands between the split and the heads",
             example_inputs={"x3": (_F, (_B, _S, 12)), "scale": (_F, (4,))},
             example_values={"x_shape": _shape(0, 0, 3, 4), "x_shape_allowzero": 0, "epsilon": 1e-6, "axis": -1,
                             "stash_type": 1}),
        Rule("rotary-packed-heads", rotary_of_heads, rotate_then_split, check_rotary_of_heads,
             doc="RotaryEmbedding(heads(x3)) -> heads(RotaryEmbedding(x3, num_heads=H)), half or interleaved, "
                 "whole or partial",
             example_inputs={"x3": (_F, (_B, _S, 12)), "cos": (_F, (_B, _S, 2)), "sin": (_F, (_B, _S, 2))},
             # interleaved pairs (GPT-J's rotate_every_two): the half form is the property test's too
             example_values={"x_shape": _shape(0, 0, 3, 4), "x_shape_allowzero": 0, "interleaved": 1}),
        Rule("attention-packed-heads", attention_of_heads, on_packed_heads, check_attention_of_heads,
             doc="merge(Attention(heads(q3), heads(k3), heads(v3), ...)) -> Attention(q3, k3, v3, ..., q/kv_num_heads)",
             # static dims: onnx infers Attention's present shapes only from known lengths, and the
             # self-check needs every output of the pattern typed and shaped
             example_inputs={"q3": (_F, (2, 3, 16)), "k3": (_F, (2, 3, 8)), "v3": (_F, (2, 3, 8)),
                             "past_k": (_F, (2, 2, 4, 4)), "past_v": (_F, (2, 2, 4, 4)),
                             "mask_past": (_F, (2, 1, 3, 4)), "mask_new": (_F, (2, 1, 3, 3))},
             example_values={**_MASK_VALUE, "q_shape": _shape(0, 0, 4, 4), "k_shape": _shape(0, 0, 2, 4), "v_shape": _shape(0, 0, 2, 4),
                             "out_shape": _shape(0, 0, 16), "q_shape_allowzero": 0, "k_shape_allowzero": 0,
                             "v_shape_allowzero": 0, "out_allowzero": 0}),
    ],
    name="attention-io",
)


class AttentionIOPass(RewritePass):
    """Give Attention its KV-cache inputs and packed heads, and RotaryEmbedding packed heads (onnxruntime).

    The rule table is ``RULES``; the module docstring gives the three
    rewrites and why each is exact. First, q, k and v that a layer cuts out
    of a fused projection some other way (Falcon, GPT-BigCode, GPT-NeoX) are
    made ``heads(x3)`` of its columns (:mod:`qgraph_passes.projection_heads`).
    """

    name = "attention-io"
    rules = RULES

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count, notes = read_heads_from_projections(model)
        if count:
            self.report.count("projection-heads", count)
        self.report.notes.extend(f"attention-io: {note}" for note in notes)
        result = super().call(model)
        return ir.passes.PassResult(model, result.modified or count > 0)

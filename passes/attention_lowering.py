"""Attention (opset 23) -> what a target's compiler takes.

``to=primitive`` rebuilds the core from ops every compiler has, valid at
opset 17 and without ``Trilu`` (the qaic preset lowers this way before it
converts the opset down): an explicit repeat_kv (Unsqueeze/Expand/Reshape)
when K/V have fewer heads than Q, ``MatMul(Q, K^T) * scale``, the
soft-cap ``Tanh(x / c) * c``, the mask (``Where`` for a boolean one, ``Add``
for an additive one, a ``Range``/``LessOrEqual`` comparison for
``is_causal``, aligned to the upper left as onnxruntime aligns it),
``Softmax`` and ``MatMul`` with V. A row with every score masked gives
zeros, as onnxruntime's Attention does: the Softmax is followed by the
IsNaN/Where guard. (onnxruntime also zeroes rows whose additive mask is
exactly the dtype's lowest value; the primitive form averages them. The
attention fusion never emits such a mask -- see ``attention_masks``.)
Past key/value inputs are concatenated in front of K/V along the sequence
axis and become the present outputs.

``to=mha`` gives ``com.microsoft::MultiHeadAttention`` when Q and K/V have
the same static head count and there is no soft-cap, is_causal or past
(a NaN guard after it zeroes fully masked rows, as Attention does);
anything else stays an ``Attention`` with a note in the report. ``to=gqa``
(``com.microsoft::GroupQueryAttention``) is accepted as an option but lowers
nothing yet: that op is causal-only and takes padding as per-row sequence
lengths, and deriving those from a mask input is not implemented; every
node is kept with a note.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.pass_base import Option, Pass
from qgraph.rewrite import replace_node

__all__ = ["LowerAttentionPass"]


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _static_heads(node: ir.Node) -> tuple[int | None, int | None]:
    def heads(value: ir.Value | None, attr: str) -> int | None:
        if value is not None and value.shape is not None and len(value.shape) == 4 and isinstance(value.shape[1], int):
            return value.shape[1]
        return _attr(node, attr, None)
    return heads(node.inputs[0], "q_num_heads"), heads(node.inputs[1], "kv_num_heads")


def _unsupported(node: ir.Node, to: str) -> str | None:
    """Why this Attention cannot be lowered ``to`` the target, if it cannot."""
    ranks = {len(x.shape) for x in node.inputs[:3] if x is not None and x.shape is not None}
    if ranks != {4}:
        return "Q/K/V are not all known to be 4-D"
    if len(node.outputs) > 3 and (node.outputs[3].uses() or node.outputs[3].is_graph_output()):
        return "its qk_matmul_output is used"
    if _input(node, 6) is not None:
        return "it has a nonpad_kv_seqlen input"
    if _attr(node, "qk_matmul_output_mode", 0) != 0:
        return "qk_matmul_output_mode is set"
    if to == "mha":
        hq, hkv = _static_heads(node)
        if hq is None or hkv is None or hq != hkv:
            return f"MultiHeadAttention needs equal static head counts (Q {hq}, K/V {hkv})"
        if _attr(node, "softcap", 0.0) or _attr(node, "is_causal", 0) or _input(node, 4) is not None:
            return "MultiHeadAttention has no soft-cap, is_causal or past inputs here"
    return None


def _repeat_kv(op, x: ir.Value, q: ir.Value, hq: int | None, hkv: int | None) -> ir.Value:
    """K/V repeated to Q's head count, head h of Q reading kv head h // (Hq / Hkv)."""
    if hq is not None and hkv is not None:
        if hq == hkv:
            return x
        reps = np.array([1, 1, hq // hkv, 1, 1], np.int64)
    else:
        n = op.Div(op.Shape(q, start=1, end=2), op.Shape(x, start=1, end=2))
        reps = op.Concat(np.ones(2, np.int64), n, np.ones(2, np.int64), axis=0)
    expanded = op.Expand(op.Unsqueeze(x, np.array([2], np.int64)), reps)
    target = op.Concat(op.Shape(x, start=0, end=1), np.array([-1], np.int64), op.Shape(x, start=2, end=4), axis=0)
    return op.Reshape(expanded, target)


def _causal(op, scores: ir.Value) -> ir.Value:
    """Query s may read key t when t <= s (upper-left aligned); no Trilu."""
    zero, one = np.array(0, np.int64), np.array(1, np.int64)
    s_len = op.Squeeze(op.Shape(scores, start=2, end=3), np.array([0], np.int64))
    t_len = op.Squeeze(op.Shape(scores, start=3, end=4), np.array([0], np.int64))
    rows = op.Unsqueeze(op.Range(zero, s_len, one), np.array([1], np.int64))
    cols = op.Unsqueeze(op.Range(zero, t_len, one), np.array([0], np.int64))
    return op.LessOrEqual(cols, rows)


def lower_primitive(op, node: ir.Node) -> list[ir.Value]:
    q, k, v, mask = node.inputs[0], node.inputs[1], node.inputs[2], _input(node, 3)
    past_k, past_v = _input(node, 4), _input(node, 5)
    dtype = q.dtype.numpy()
    if past_k is not None:
        k = op.Concat(past_k, k, axis=2)
    if past_v is not None:
        v = op.Concat(past_v, v, axis=2)
    present_k, present_v = k, v
    hq, hkv = _static_heads(node)
    k_all, v_all = _repeat_kv(op, k, q, hq, hkv), _repeat_kv(op, v, q, hq, hkv)
    head_dim = q.shape[3] if q.shape is not None and isinstance(q.shape[3], int) else None
    scale = _attr(node, "scale", None)
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim) if head_dim is not None else None
    scores = op.MatMul(q, op.Transpose(k_all, perm=[0, 1, 3, 2]))
    if scale is not None:
        scores = op.Mul(scores, np.asarray(scale, dtype))
    else:
        d = op.Cast(op.Shape(q, start=3, end=4), to=q.dtype)
        scores = op.Div(scores, op.Sqrt(d))
    softcap = _attr(node, "softcap", 0.0)
    if softcap:
        cap = np.asarray(softcap, dtype)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    neg_inf = np.asarray(-np.inf, dtype)
    if mask is not None:
        if mask.dtype == ir.DataType.BOOL:
            scores = op.Where(mask, scores, neg_inf)
        else:
            scores = op.Add(scores, mask)
    if _attr(node, "is_causal", 0):
        scores = op.Where(_causal(op, scores), scores, neg_inf)
    probs = op.Softmax(scores, axis=-1)
    probs = op.Where(op.IsNaN(probs), np.asarray(0, dtype), probs)
    return [op.MatMul(probs, v_all), present_k, present_v]


def lower_mha(op, node: ir.Node) -> list[ir.Value]:
    q, k, v, mask = node.inputs[0], node.inputs[1], node.inputs[2], _input(node, 3)
    hq, _ = _static_heads(node)
    dtype = q.dtype.numpy()
    # [B, H, S, D] -> [B, S, H*D]; K and V are taken in the BNSH layout MHA also reads.
    q3 = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), np.array([0, 0, -1], np.int64))
    inputs = [q3, k, v, None, None]
    if mask is not None:
        bias = mask
        if mask.dtype == ir.DataType.BOOL:
            bias = op.Where(mask, np.asarray(0, dtype), np.asarray(-np.inf, dtype))
        inputs.append(op.Expand(bias, op.Concat(np.ones(2, np.int64), op.Shape(q, start=2, end=3),
                                                op.Shape(k, start=2, end=3), axis=0)))
    attrs = {"num_heads": hq}
    if (scale := _attr(node, "scale", None)) is not None:
        attrs["scale"] = scale
    out3 = op.MultiHeadAttention(*inputs, _domain="com.microsoft", **attrs)
    if mask is not None:
        # MultiHeadAttention gives NaN for a row whose every key is masked
        # (-inf everywhere); Attention gives zeros there: the same guard as
        # the primitive form.
        out3 = op.Where(op.IsNaN(out3), np.asarray(0, dtype), out3)
    shape = op.Concat(np.array([0, 0], np.int64), np.array([hq, -1], np.int64), axis=0)
    out = op.Transpose(op.Reshape(out3, shape), perm=[0, 2, 1, 3])
    return [out]


class LowerAttentionPass(Pass):
    """Lower canonical Attention nodes to primitive ops (opset 17, no Trilu) or com.microsoft contrib ops."""

    name = "lower-attention"
    options = {
        "to": Option(str, "primitive", "what to lower Attention to", choices=("primitive", "mha", "gqa")),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        to = self.config["to"]
        graph = model.graph
        lowered = 0
        for node in list(graph):
            if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
                continue
            if to == "gqa":
                # GroupQueryAttention is causal-only with padding given as per-row sequence
                # lengths; turning an arbitrary mask input into those is not implemented.
                reason = "lowering to com.microsoft::GroupQueryAttention is not implemented"
            else:
                reason = _unsupported(node, to)
            if reason is not None:
                self.report.notes.append(f"kept Attention '{node.name}' (not lowered to {to}): {reason}")
                continue
            self._replace(model, node, to)
            lowered += 1
        if lowered:
            self.report.count(f"attention-to-{to}", lowered)
            if to == "mha":
                model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, lowered > 0)

    def _replace(self, model: ir.Model, node: ir.Node, to: str) -> None:
        build = lower_primitive if to == "primitive" else lower_mha
        replace_node(model, node, lambda op: build(op, node), rule_name=f"attention-to-{to}",
                     pass_name=self.name, name_prefix=f"lower-attention/{node.name}")

"""Attention cores -> one ``Attention`` (ai.onnx, opset 23) per layer.

Canonical form (docs/design.md; the kv-cache pass builds on exactly this):
``Attention(Q, K, V[, mask])`` with Q [B, Hq, S, D] and K, V [B, Hkv, T, D]
taken *before* the exporter's repeat_kv (GQA/MQA is Hkv < Hq), the product
of every scale as the ``scale`` attribute, ``softcap`` for soft-capped
logits, and the exporter's own mask subgraph as the 4th input (float
additive, or the boolean of a ``Where(mask, scores, -inf)``). A K given in
[B, T, H, D] (``Transpose(0,2,3,1)`` before the MatMul) gets a Transpose to
BHSD in front. ``q_num_heads``/``kv_num_heads`` are set when the head
counts are static (onnxruntime 1.32 accepts them beside 4-D inputs and
reads the counts from the shapes either way). Every fused node carries
``qgraph.layer`` (the layer index read from the exporter's scope names,
when there is one) and ``qgraph.scope`` in its metadata.

What is matched (``attention_core``): MatMul(q, kt) -> optional scalar
Mul/Div -> optional soft-cap ``Tanh(x / c) * c`` -> optional additive mask
(Add) or boolean mask (Where) -> Softmax over the last axis -> optional
IsNaN/Where guard -> MatMul with v. The condition is a list of named
predicates (``attention_core_checks``: casts, scale, soft-cap, operands,
ranks, head groups, mask, layer), the first that fails being the core's
near miss; it walks from q, kt and v to Q, K, V (``attention_operands``),
proving every Reshape/Expand it crosses (``attention_dims``); rotary embeddings and q/k norms before that
are left as they are. What onnxruntime needs of the mask, and how padding
keeps its meaning, is in ``attention_masks``.

Batched heads (``attention-core-batched-heads``, BLOOM's baddbmm/bmm): Q,
K, V reshaped from [B, H, S, D] to [B*H, S, D], 3-D scores with an
optional position bias added before and/or after the scale, a view to
[B, H, S, T] for the mask and Softmax, a view back to [B*H, S, T] and the
product with V. Every view is proven to merge or split exactly the batch
and head axes (``attention_batched``); the fused node is the same 4-D
``Attention`` (its output viewed back to [B*H, S, D] for the exporter's
next Reshape). A position bias -- a value that reads only the attention
mask and shapes (``attention_bias``) -- joins the mask input:
``mask = bias * (scores' scale if added before it) + additive(mask)`` in
Q's dtype, shaped [B, H, 1 or S, T] (broadcast by Add to the exporter's
mask), and the node carries ``qgraph.mask_bias = "position"``.

4-D scores with a position bias (``attention-core-biased``, Falcon/MPT-style
ALiBi ``alibi.view(B, H, 1, -1)`` added before or after the scale, then the
mask): the same folding, the bias kept 4-D. The bias is a fixed part of
that pattern, so the rule never competes with ``attention-core``; a 4-D
core whose *only* additive term is the bias is the plain rule's (the bias
is then simply its mask input: exact, but not marked as a position bias).

A boolean Where followed by an additive mask (GPT-Neo: causal Where, then
the padding mask) becomes one additive mask, ``Where(keep, 0, fill) +
mask`` summed in Q's dtype and made onnxruntime-safe like any other.

Opset-23 graphs where the exporter already emitted ``Attention`` behind a
repeat_kv get the repeat absorbed (``absorb-repeat-kv``).

A core that does not fuse is reported per layer with the first failed
check; nothing is silently skipped.

Not done yet: ``is_causal`` is never set -- causal masks (Range/compare or
Trilu) stay the mask input, which is exact but not the shortest form, and
no exporter of the zoo emits a pure causal mask anyway; a scale that is
not a constant (computed from a Shape) or applied after the mask is
reported, not fused; the property tests draw float32 only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.attention_batched import dims4, key_of_transposed, merges_batch_and_heads, pins_element_count, splits_batch_and_heads, unmerge_heads
from qgraph_passes.attention_bias import MASK_BIAS_KEY, POSITION, bias_as_4d, bias_broadcasts, reads_only_mask_and_shapes
from qgraph_passes.attention_core_checks import (
    casts_keep_the_dtype,
    core_located,
    is_float,
    layer_of,
    mask_has_an_attention_form,
    mask_plan,
    mask_spans_queries_and_keys,
    operands_are_4d_float,
    operands_before_scale_transpose_and_repeat_kv,
    query_heads_group_kv_heads,
    rank,
    scores_scale,
    scores_scale_is_a_scalar,
    softcap_is_a_positive_scalar,
)
from qgraph_passes.attention_dims import dim_of, product, traced_dim
from qgraph_passes.attention_masks import reuse, safe_fill, stamp
from qgraph_passes.attention_operands import peel_repeat_kv, peel_scale
from qgraph_passes.opset_upgrade import opset_at_least

from qgraph.rewrite import Match, Rule, RuleSet, apply_rules, explain
from qgraph.rewrite_pass import RewritePass

__all__ = ["AttentionFusionPass", "layer_of"]

LAYER_KEY = "qgraph.layer"
SCOPE_KEY = "qgraph.scope"


# -- the pattern --------------------------------------------------------------


def _masked_softmax(op, scores, mask, keep, *more_masks):
    """The part every core shares: optional additive or Where mask, Softmax over the keys, NaN guard, casts.

    ``more_masks``: further spellings of the masked scores, tried after the
    usual three. Eager attention's softmax(..., dtype=float32).to(q.dtype)
    exports as one or two Casts.
    """
    masked = op.any_of(
        op.Add(scores, mask),
        op.Where(keep, scores, op.const(name="fill")),
        scores,
        *more_masks,
        name="masking",
    )
    masked = op.optional(op.Cast(masked, to=op.capture("cast_in")), name="cast_before_softmax")
    probs = op.Softmax(masked, axis=op.attr(lambda a: a in (-1, 3), name="softmax_axis"))
    guarded = op.any_of(op.Where(op.IsNaN(probs), op.const(0.0), probs), probs, name="nan_guard")
    cast = op.optional(op.Cast(guarded, to=op.capture("cast_out")), name="cast_after_softmax")
    return op.optional(op.Cast(cast, to=op.capture("cast_out2")), name="cast_after_softmax2")


def attention_core(op, q, kt, v, mask, keep):
    scores = op.MatMul(q, kt)
    scaled = op.any_of(
        op.Mul(scores, op.const(name="qk_scale")),
        op.Div(scores, op.const(name="qk_divisor")),
        scores,
        name="qk_scaling",
    )
    cap = op.const(name="cap")
    capped = op.any_of(op.Mul(op.Tanh(op.Div(scaled, cap)), cap), scaled, name="softcapping")
    # GPT-Neo: the causal/local mask by Where, then the padding mask added.
    gpt_neo = op.Add(op.Where(keep, capped, op.const(name="fill")), mask)
    cast = _masked_softmax(op, capped, mask, keep, gpt_neo)
    return op.MatMul(cast, v)


def check_core(match: Match, q, kt, v, mask=None, keep=None, qk_scaling=2, softcapping=1, masking=2,
               nan_guard=1, softmax_axis=-1, qk_scale=None, qk_divisor=None, cap=None, fill=None,
               cast_in=None, cast_out=None, cast_out2=None):
    """The facts that make a matched core one ``Attention``; the first that fails is its near miss.

    Each predicate (``attention_core_checks``) checks one fact and records
    what it proves in the match, for the replacement.
    """
    return (casts_keep_the_dtype(q, v, (cast_in, cast_out, cast_out2))
            or scores_scale_is_a_scalar(match, qk_scaling, qk_scale, qk_divisor)
            or softcap_is_a_positive_scalar(match, softcapping, cap)
            or operands_before_scale_transpose_and_repeat_kv(match, q, kt, v)
            or operands_are_4d_float(match)
            or query_heads_group_kv_heads(match)
            or mask_has_an_attention_form(match, masking, mask, keep, fill)
            or core_located(match))


# -- the replacement ------------------------------------------------------------


def _mask_input(op, plan, dtype: np.dtype) -> ir.Value | None:
    if plan is None:
        return None
    kind, source, extra = plan
    if kind == "where-then-add":
        # Where(keep, s, fill) + mask == s + (Where(keep, 0, fill) + mask), summed in the same
        # dtype (fill + fill overflows to -inf as in the original), then made safe like any
        # additive mask.
        fill, mask = extra
        summed = op.Add(op.Where(source, np.zeros((), dtype), np.asarray(fill, dtype)), mask)
        return _mask_input(op, ("additive", summed, ("clamp",)), dtype)
    if kind == "where":
        if np.isneginf(extra):
            return source  # boolean: True attends, as in the Where
        made = reuse(source, f"additive:{extra}")
        if made is None:
            made = stamp(op.Where(source, np.zeros((), dtype), np.asarray(safe_fill(extra, dtype), dtype)),
                         f"additive:{extra}")
        return made
    if extra is None:
        return source
    if extra[0] == "rewhere":
        _, cond, a, b = extra
        kind = f"safe-fill:{a}:{b}"
        made = reuse(cond, kind)
        return made or stamp(op.Where(cond, np.asarray(a, dtype), np.asarray(b, dtype)), kind)
    made = reuse(source, "safe-fill")
    if made is not None:
        return made
    lowest_half = np.asarray(float(np.finfo(dtype).min) / 2, dtype)
    clamped = op.Max(source, lowest_half)
    return stamp(op.Where(op.IsInf(source, detect_positive=0), source, clamped), "safe-fill")


def _spanning(op, mask: ir.Value, query: ir.Value, key: ir.Value, t_axis: int) -> ir.Value:
    """Expand a broadcastable mask to [.., S, T], the only form onnxruntime takes."""
    seq = op.Shape(query, start=2, end=3)
    total = op.Shape(key, start=t_axis, end=t_axis + 1)
    return op.Expand(mask, op.Concat(np.ones(2, np.int64), seq, total, axis=0))


def to_attention(op, match: Match, query, key, value_, key_format, scale, softcap, heads, mask_plan,
                 mask_dims_ok, layer, scope):
    dtype = query.dtype.numpy()
    if key_format == "BSHD":
        key = op.Transpose(key, perm=[0, 2, 1, 3])
    mask = _mask_input(op, mask_plan, dtype)
    if mask is not None and not mask_dims_ok:
        mask = _spanning(op, mask, query, match["key"], 1 if key_format == "BSHD" else 2)
    inputs = [query, key, value_] + ([mask] if mask is not None else [])
    q_heads, kv_heads = heads if heads is not None else (None, None)
    out = op.Attention(*inputs, scale=scale, softcap=softcap, q_num_heads=q_heads, kv_num_heads=kv_heads)
    node = out.producer()
    if layer is not None:
        node.metadata_props[LAYER_KEY] = layer
    node.metadata_props[SCOPE_KEY] = scope
    return out


# -- attention on batched heads: 3-D [B*H, S, D] (BLOOM) ---------------------------


def batched_heads_core(op, q, kt, v, bias_pre, bias_post, mask, keep, scores_shape, probs_shape):
    """BLOOM's baddbmm/bmm: 3-D scores [B*H, S, T], viewed 4-D for the mask and Softmax."""
    scores = op.MatMul(q, kt)
    pre = op.any_of(op.Add(scores, bias_pre), scores, name="bias_before_scale")
    scaled = op.any_of(
        op.Mul(pre, op.const(name="qk_scale")),
        op.Div(pre, op.const(name="qk_divisor")),
        pre,
        name="qk_scaling",
    )
    post = op.any_of(op.Add(scaled, bias_post), scaled, name="bias_after_scale")
    scores4 = op.Reshape(post, scores_shape, allowzero=op.capture("scores_allowzero"), _name="scores_view")
    cast = _masked_softmax(op, scores4, mask, keep)
    probs3 = op.Reshape(cast, probs_shape, allowzero=op.capture("probs_allowzero"), _name="probs_view")
    return op.MatMul(probs3, v)


def check_batched(match: Match, q, kt, v, scores_view: ir.Node, probs_view: ir.Node, bias_pre=None,
                  bias_post=None, mask=None, keep=None, bias_before_scale=1, qk_scaling=2, bias_after_scale=1,
                  masking=2, qk_scale=None, qk_divisor=None, fill=None, cast_in=None, cast_out=None,
                  cast_out2=None, **_):
    """Prove every Reshape between the 3-D products and the 4-D Attention; fold the biases."""
    reason = casts_keep_the_dtype(q, v, (cast_in, cast_out, cast_out2))
    if reason:
        return reason
    scores_factor = scores_scale(qk_scaling, qk_scale, qk_divisor)
    if isinstance(scores_factor, str):
        return scores_factor

    q3, q_scale = peel_scale(q)
    query = unmerge_heads(q3, "query")
    if isinstance(query, str):
        return query
    keyed = key_of_transposed(peel_scale(kt)[0])
    if isinstance(keyed, str):
        return keyed
    key, k_scale = keyed
    kt_scale = peel_scale(kt)[1]
    value = unmerge_heads(v, "value")
    if isinstance(value, str):
        return value
    for name, x in (("Q", query), ("K", key), ("V", value)):
        if not is_float(x):
            return f"{name} ('{x.name}') is not a float tensor"

    qd, kd, vd = dims4(query), dims4(key), dims4(value)
    batch_heads = product(qd[0], qd[1])
    for name, d in (("K", kd), ("V", vd)):
        if product(d[0], d[1]) != batch_heads:
            return f"cannot prove {name}'s batch x heads {product(d[0], d[1])!r} equals Q's {batch_heads!r}"
    if kd[2] != vd[2]:
        return f"cannot prove K and V have the same length ({kd[2]!r}, {vd[2]!r})"
    reason = (splits_batch_and_heads(scores_view, qd[0], qd[1], qd[2], kd[2])
              or merges_batch_and_heads(probs_view, qd[0], qd[1], qd[2], kd[2]))
    if reason:
        return reason

    # K/V before a repeat_kv (GQA), as for the 4-D form.
    repeated_k, repeated_v = peel_repeat_kv(key), peel_repeat_kv(value)
    for r in (repeated_k, repeated_v):
        if isinstance(r, str):
            return r
    n_k = 1 if repeated_k is None else repeated_k[1]
    n_v = 1 if repeated_v is None else repeated_v[1]
    if n_k != n_v:
        return f"K is repeated {n_k}x but V {n_v}x"
    key = key if repeated_k is None else repeated_k[0]
    value = value if repeated_v is None else repeated_v[0]

    plan = mask_plan(masking, mask, keep, fill, query.dtype.numpy())
    if isinstance(plan, str):
        return plan
    exporter_mask = mask if masking == 0 else keep if masking == 1 else None
    biases = []
    scores3 = [batch_heads, qd[2], kd[2]]
    for bias, factor in ((bias_pre if bias_before_scale == 0 else None, scores_factor),
                         (bias_post if bias_after_scale == 0 else None, 1.0)):
        if bias is None:
            continue
        reason = (reads_only_mask_and_shapes(bias, exporter_mask)
                  or bias_broadcasts(bias, scores3, count_pinned=pins_element_count(probs_view)))
        if reason:
            return reason
        biases.append((bias, factor))

    match["query"], match["key"], match["value_"] = query, key, value
    match["scale"] = float(scores_factor * q_scale * kt_scale * k_scale)
    heads_q, heads_kv = dim_of(query, 1), dim_of(key, 1)
    match["heads"] = (heads_q, heads_kv) if isinstance(heads_q, int) and isinstance(heads_kv, int) else None
    match["mask_plan"] = plan
    match["biases"] = biases
    match["mask_dims_ok"] = exporter_mask is None or mask_spans_queries_and_keys(exporter_mask, query, key, "BHSD")
    return core_located(match)


def _additive(op, plan, dtype: np.dtype) -> ir.Value | None:
    """The exporter's mask as an additive float mask (onnxruntime-safe fill), or None."""
    mask = _mask_input(op, plan, dtype)
    if mask is None or mask.dtype is None or mask.dtype.is_floating_point():
        return mask
    made = reuse(mask, "additive:-inf")
    return made or stamp(op.Where(mask, np.zeros((), dtype), np.asarray(-np.inf, dtype)), "additive:-inf")


def _biased_mask(op, mask_plan, biases, dtype: np.dtype, as_4d) -> ir.Value:
    """``safe(sum of bias * factor + additive(exporter's mask))``: the mask input of a biased core."""
    mask = _additive(op, mask_plan, dtype)
    for bias, factor in biases:
        term = as_4d(bias)
        if factor != 1.0:
            term = op.Mul(term, np.asarray(factor, dtype))
        mask = term if mask is None else op.Add(term, mask)
    # A bias of ordinary size leaves the clamp a no-op; one holding a masking fill
    # (finfo.min) gets the same onnxruntime-safe fill as any additive mask.
    return _mask_input(op, ("additive", mask, ("clamp",)), dtype)


def to_batched_attention(op, match: Match, query, key, value_, scale, heads, mask_plan, biases, mask_dims_ok,
                         layer, scope):
    dtype = query.dtype.numpy()
    if biases:
        mask = _biased_mask(op, mask_plan, biases, dtype, lambda bias: bias_as_4d(op, bias, query))
        spans = mask_plan is not None and mask_dims_ok and mask_plan[0] == "additive"
    else:
        mask, spans = _mask_input(op, mask_plan, dtype), mask_dims_ok
    if mask is not None and not spans:
        mask = _spanning(op, mask, query, key, 2)
    inputs = [query, key, value_] + ([mask] if mask is not None else [])
    q_heads, kv_heads = heads if heads is not None else (None, None)
    out = op.Attention(*inputs, scale=scale, q_num_heads=q_heads, kv_num_heads=kv_heads)
    node = out.producer()
    if layer is not None:
        node.metadata_props[LAYER_KEY] = layer
    node.metadata_props[SCOPE_KEY] = scope
    if biases:
        node.metadata_props[MASK_BIAS_KEY] = POSITION
    # Back to the exporter's [B*H, S, Dv]; a following view to [B, H, S, Dv] folds away later.
    return op.Reshape(out, op.Concat(np.array([-1], np.int64), op.Shape(out, start=2), axis=0))



# -- 4-D scores with a position bias (Falcon/MPT-style ALiBi) ----------------------------
# The bias is part of the pattern (never optional), so this rule never competes with
# attention-core for a plain core: it matches only where a bias sits before the mask.

_PLACEMENTS = ("both", "before", "after")


def _scaled(op, x, tag: str):
    return op.any_of(
        op.Mul(x, op.const(name=f"qk_scale_{tag}")),
        op.Div(x, op.const(name=f"qk_divisor_{tag}")),
        x,
        name=f"qk_scaling_{tag}",
    )


def biased_core(op, q, kt, v, bias_pre, bias_post, mask, keep):
    """4-D scores with a bias added before and/or after the scale, then the mask."""
    biased = op.any_of(
        op.Add(_scaled(op, op.Add(op.MatMul(q, kt), bias_pre), "both"), bias_post),
        _scaled(op, op.Add(op.MatMul(q, kt), bias_pre), "before"),
        op.Add(_scaled(op, op.MatMul(q, kt), "after"), bias_post),
        name="bias_placement",
    )
    cast = _masked_softmax(op, biased, mask, keep)
    return op.MatMul(cast, v)


def check_biased(match: Match, q, kt, v, bias_pre=None, bias_post=None, mask=None, keep=None, bias_placement=0,
                 masking=2, fill=None, cast_in=None, cast_out=None, cast_out2=None, **rest):
    """The plain core's checks, then each bias: reads only the mask and shapes, keeps the scores' shape."""
    tag = _PLACEMENTS[bias_placement]
    qk_scaling = rest.get(f"qk_scaling_{tag}", 2)
    qk_scale, qk_divisor = rest.get(f"qk_scale_{tag}"), rest.get(f"qk_divisor_{tag}")
    reason = check_core(match, q, kt, v, mask=mask, keep=keep, qk_scaling=qk_scaling, masking=masking,
                        qk_scale=qk_scale, qk_divisor=qk_divisor, fill=fill, cast_in=cast_in, cast_out=cast_out,
                        cast_out2=cast_out2)
    if reason:
        return reason
    scores_factor = scores_scale(qk_scaling, qk_scale, qk_divisor)
    query, key = match["query"], match["key"]
    t_axis = 1 if match["key_format"] == "BSHD" else 2
    scores4 = [traced_dim(query, 0), traced_dim(query, 1), traced_dim(query, 2), traced_dim(key, t_axis)]
    exporter_mask = mask if masking == 0 else keep if masking == 1 else None
    biases = []
    for bias, factor in ((bias_pre if tag in ("both", "before") else None, scores_factor),
                         (bias_post if tag in ("both", "after") else None, 1.0)):
        if bias is None:
            continue
        reason = (reads_only_mask_and_shapes(bias, exporter_mask)
                  or bias_broadcasts(bias, scores4, keys_contracted=True))
        if reason:
            return reason
        biases.append((bias, factor))
    match["biases"] = biases
    match["mask_dims_ok"] = exporter_mask is not None and mask_spans_queries_and_keys(exporter_mask, query, key, match["key_format"])
    return None


def to_biased_attention(op, match: Match, query, key, value_, key_format, scale, heads, mask_plan, biases,
                        mask_dims_ok, layer, scope):
    dtype = query.dtype.numpy()
    mask = _biased_mask(op, mask_plan, biases, dtype, lambda bias: bias)
    if not mask_dims_ok:
        mask = _spanning(op, mask, query, key, 1 if key_format == "BSHD" else 2)
    if key_format == "BSHD":
        key = op.Transpose(key, perm=[0, 2, 1, 3])
    q_heads, kv_heads = heads if heads is not None else (None, None)
    out = op.Attention(query, key, value_, mask, scale=scale, q_num_heads=q_heads, kv_num_heads=kv_heads)
    node = out.producer()
    if layer is not None:
        node.metadata_props[LAYER_KEY] = layer
    node.metadata_props[SCOPE_KEY] = scope
    node.metadata_props[MASK_BIAS_KEY] = POSITION
    return out


# -- opset-23 Attention behind a repeat_kv --------------------------------------


def existing_attention(op, q, k, v):
    return op.Attention(q, k, v, _name="attention")


def existing_attention_masked(op, q, k, v, mask):
    return op.Attention(q, k, v, mask, _name="attention")


def check_absorb(match: Match, attention: ir.Node, k, v):
    if any(out.uses() or out.is_graph_output() for out in attention.outputs[1:]):
        return "the Attention's present-key/value or qk outputs are used"
    if "q_num_heads" in attention.attributes and rank(k) == 3:
        return "3-D Attention inputs"
    rk, rv = peel_repeat_kv(k), peel_repeat_kv(v)
    for name, r in (("K", rk), ("V", rv)):
        if isinstance(r, str):
            return r
    if rk is None and rv is None:
        return "no repeat_kv in front of the Attention"
    nk = 1 if rk is None else rk[1]
    nv = 1 if rv is None else rv[1]
    if nk != nv:
        return f"K is repeated {nk}x but V {nv}x"
    match["key"] = k if rk is None else rk[0]
    match["value_"] = v if rv is None else rv[0]
    return None


def _absorbed(op, match: Match, q, key, value_, attention: ir.Node, mask=None):
    attrs = {name: attr.value for name, attr in attention.attributes.items()
             if name not in ("q_num_heads", "kv_num_heads")}
    inputs = [q, key, value_] + ([mask] if mask is not None else [])
    out = op.Attention(*inputs, **attrs)
    out.producer().metadata_props.update(
        {k: v for k, v in attention.metadata_props.items() if k in (LAYER_KEY, SCOPE_KEY)}
    )
    return out


def absorb(op, match: Match, q, key, value_, attention):
    return _absorbed(op, match, q, key, value_, attention)


def absorb_masked(op, match: Match, q, key, value_, attention, mask):
    return _absorbed(op, match, q, key, value_, attention, mask)


# -- examples for the rule self-check (``qgraph verify-rules``) ------------------
# A Llama-like GQA layer: 4 query heads, 2 kv heads repeated twice, head dim 8.

_FLOAT, _BOOL = ir.DataType.FLOAT, ir.DataType.BOOL


def _example_repeat_kv(op, x):
    """HF's repeat_kv(x, 2) as exported: [B, 2, T, 8] -> [B, 4, T, 8]."""
    expanded = op.Expand(op.Unsqueeze(x, np.array([2], np.int64)), np.array([1, 1, 2, 1, 1], np.int64))
    return op.Reshape(expanded, np.array([0, 4, -1, 8], np.int64))


_EXAMPLE_INPUTS = {
    "q": (_FLOAT, ("B", 4, "S", 8)),
    "k_heads": (_FLOAT, ("B", 2, "T", 8)),
    "v_heads": (_FLOAT, ("B", 2, "T", 8)),
    "mask": (_FLOAT, ("B", 1, "S", "T")),
    "keep": (_BOOL, ("B", 1, "S", "T")),
}
_EXAMPLE_OPERANDS = {
    "k": lambda op, k_heads: _example_repeat_kv(op, k_heads),
    "v": lambda op, v_heads: _example_repeat_kv(op, v_heads),
}
_EXAMPLE_CORE = {
    "kt": lambda op, k_heads: op.Transpose(_example_repeat_kv(op, k_heads), perm=[0, 1, 3, 2]),
    "v": _EXAMPLE_OPERANDS["v"],
    "qk_scale": np.float32(8 ** -0.5),
    "qk_divisor": np.float32(8 ** 0.5),
    "cap": np.float32(30.0),
    "fill": np.float32(np.finfo(np.float32).min),
    "cast_in": int(_FLOAT),
    "cast_out": int(_FLOAT),
    "cast_out2": int(_FLOAT),
}

# BLOOM's layout: [B, 4, S, 8] heads merged to [B*4, S, 8]; a position bias over keys (shapes only).


def _merged(op, x):
    return op.Reshape(x, op.Concat(np.array([-1], np.int64), op.Shape(x, start=2), axis=0))


def _key_positions(op, k4):
    length = op.Squeeze(op.Shape(k4, start=2, end=3), np.array([0], np.int64))
    positions = op.Range(np.array(0, np.int64), length, np.array(1, np.int64))
    return op.Mul(op.Cast(positions, to=int(_FLOAT)), np.float32(-0.25))


_EXAMPLE_BATCHED_INPUTS = {
    "q4": (_FLOAT, ("B", 4, "S", 8)),
    "k4": (_FLOAT, ("B", 4, "T", 8)),
    "v4": (_FLOAT, ("B", 4, "T", 8)),
    "mask": (_FLOAT, ("B", 1, "S", "T")),
    "keep": (_BOOL, ("B", 1, "S", "T")),
}
_EXAMPLE_BATCHED = {
    "q": lambda op, q4: _merged(op, q4),
    "kt": lambda op, k4: op.Transpose(_merged(op, k4), perm=[0, 2, 1]),
    "v": lambda op, v4: _merged(op, v4),
    "bias_pre": _key_positions,
    "bias_post": _key_positions,
    "scores_shape": lambda op, q4, k4: op.Concat(op.Shape(q4, start=0, end=3), op.Shape(k4, start=2, end=3), axis=0),
    # BLOOM's view: [B*H, S, -1] (the -1 on T pins the element count, so the bias needs no dim proof).
    "probs_shape": lambda op, q4: op.Concat(op.Mul(op.Shape(q4, start=0, end=1), op.Shape(q4, start=1, end=2)),
                                            op.Shape(q4, start=2, end=3), np.array([-1], np.int64), axis=0),
    "scores_allowzero": 0,
    "probs_allowzero": 0,
    **{name: _EXAMPLE_CORE[name] for name in ("qk_scale", "qk_divisor", "fill", "cast_in", "cast_out", "cast_out2")},
}

# Falcon's ALiBi layout: 4-D scores [B, 4, S, T] plus slope_h * key index (shapes only).


def _key_bias_4d(op, k4):
    positions = op.Reshape(_key_positions(op, k4), op.Concat(np.ones(3, np.int64), op.Shape(k4, start=2, end=3), axis=0))
    return op.Mul(positions, np.linspace(0.5, 2, 4, dtype=np.float32).reshape(1, 4, 1, 1))


_EXAMPLE_BIASED_INPUTS = dict(_EXAMPLE_BATCHED_INPUTS)
_EXAMPLE_BIASED = {
    "kt": lambda op, k4: op.Transpose(k4, perm=[0, 1, 3, 2]),
    "q": lambda op, q4: op.Identity(q4),
    "v": lambda op, v4: op.Identity(v4),
    "bias_pre": _key_bias_4d,
    "bias_post": _key_bias_4d,
    **{f"{kind}_{tag}": _EXAMPLE_CORE[kind] for kind in ("qk_scale", "qk_divisor") for tag in _PLACEMENTS},
    **{name: _EXAMPLE_CORE[name] for name in ("fill", "cast_in", "cast_out", "cast_out2")},
}

RULES = RuleSet(
    [
        # Attention multiplies by the scale where an export may divide, and soft-caps (tanh(x/c)*c) after
        # scaling in its own order: the same arithmetic regrouped, whose last bit softmax amplifies on
        # the self-check's scores (up to ~1e5), hence the check tolerance of 1e-3 of these rules.
        Rule("attention-core", attention_core, to_attention, check_core, commute=True,
             doc="MatMul/scale/softcap/mask/Softmax/MatMul -> Attention(Q, K, V, mask)",
             example_inputs=_EXAMPLE_INPUTS, example_values=_EXAMPLE_CORE, check_tolerance=1e-3),
        Rule("attention-core-batched-heads", batched_heads_core, to_batched_attention, check_batched, commute=True,
             doc="3-D [B*H, S, D] MatMul/scale/bias/view/mask/Softmax/view/MatMul -> Attention (bias into the mask)",
             example_inputs=_EXAMPLE_BATCHED_INPUTS, example_values=_EXAMPLE_BATCHED, check_tolerance=1e-3),
        # and computes QK*scale + bias*scale where the export computed (QK + bias)*scale.
        Rule("attention-core-biased", biased_core, to_biased_attention, check_biased, commute=True,
             doc="4-D MatMul/bias/scale/bias/mask/Softmax/MatMul -> Attention (position bias into the mask)",
             example_inputs=_EXAMPLE_BIASED_INPUTS, example_values=_EXAMPLE_BIASED, check_tolerance=1e-3),
        Rule("absorb-repeat-kv", existing_attention, absorb, check_absorb,
             doc="Attention(q, repeat_kv(k), repeat_kv(v)) -> Attention(q, k, v)",
             example_inputs=_EXAMPLE_INPUTS, example_values=_EXAMPLE_OPERANDS),
        Rule("absorb-repeat-kv-masked", existing_attention_masked, absorb_masked, check_absorb,
             doc="Attention(q, repeat_kv(k), repeat_kv(v), mask) -> Attention(q, k, v, mask)",
             example_inputs=_EXAMPLE_INPUTS, example_values=_EXAMPLE_OPERANDS),
    ],
    name="attention",
)


def _every_value_shaped(graph: ir.Graph) -> bool:
    return all(v.shape is not None and v.dtype is not None for node in graph for v in node.outputs)


def _softmax_feeds(node: ir.Node) -> ir.Node | None:
    """The Softmax behind a MatMul's first input (through a NaN guard or Casts), if any."""
    value = node.inputs[0] if node.inputs else None
    for _ in range(5):
        producer = value.producer() if value is not None else None
        if producer is None:
            return None
        if producer.op_type == "Softmax":
            return producer
        if producer.op_type == "Where" and len(producer.inputs) == 3:
            value = producer.inputs[2]
        elif producer.op_type in ("Cast", "Identity", "Reshape"):
            value = producer.inputs[0]
        else:
            return None
    return None


class AttentionFusionPass(RewritePass):
    """Fuse every exporter's attention core into the canonical Attention (opset 23), per layer.

    Runs onnx shape inference first unless every value already has a type and
    shape (ranks and static head counts come from them); removes the repeat_kv, transposes and scales the fused cores no
    longer read. Reports, per layer, each core that did not fuse and the
    first check it failed.
    """

    name = "attention"
    prerequisites = (opset_at_least(23),)
    rules = RULES

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # onnx shape inference costs a serialization round trip of the whole
        # model (most of this pass's time on a dynamo export, and worse than
        # linear); it only runs when some value still lacks a type or shape.
        if not _every_value_shaped(model.graph):
            ir.passes.common.ShapeInferencePass(data_prop=True)(model)
        stats = apply_rules(model, self.rules, pass_name=self.name, max_sweeps=self.max_sweeps)
        for rule_name, n in stats.matches.items():
            self.report.count(rule_name, n)
        if stats.total:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            layers = sorted({n.metadata_props[LAYER_KEY] for n in model.graph
                             if n.op_type == "Attention" and LAYER_KEY in n.metadata_props}, key=int)
            self.report.notes.append(
                f"fused {stats.total} attention core(s)" + (f" (layers {', '.join(layers)})" if layers else "")
            )
        self.report.notes.extend(self.unfused_notes(model))
        return ir.passes.PassResult(model, stats.total > 0)

    def unfused_notes(self, model: ir.Model) -> list[str]:
        """One note per Softmax-fed MatMul no core rule rewrote, with the first check that failed.

        A MatMul that reads the probabilities through a Reshape is a batched-heads
        core (3-D products): its reason is the batched rule's. Otherwise the reason
        is the plain 4-D rule's, or the biased rule's when that one got further.
        """
        if not any(n.op_type == "Softmax" for n in model.graph):
            return []  # every core fused: no MatMul is fed by a Softmax, so explaining them all finds nothing
        notes = []
        names = ("attention-core", "attention-core-biased", "attention-core-batched-heads")
        cores = RuleSet([self.rules.get(name) for name in names])
        nodes = {n.name: n for n in model.graph}
        tried: dict[str, dict[str, object]] = {}
        for cand in explain(model, cores):
            tried.setdefault(cand.node, {})[cand.rule] = cand
        for name, by_rule in tried.items():
            node = nodes.get(name)
            if node is None or node.graph is not model.graph or any(c.matched for c in by_rule.values()):
                continue
            softmax = _softmax_feeds(node)
            if softmax is None:
                continue
            probs = node.inputs[0].producer()
            if probs is not None and probs.op_type == "Reshape":
                cand = by_rule.get(names[2])
            else:
                plain, biased = by_rule.get(names[0]), by_rule.get(names[1])
                cand = biased if plain is None or (biased is not None and
                                                   biased.nodes_matched > plain.nodes_matched) else plain
            if cand is None:
                continue
            layer = layer_of(softmax) or layer_of(node)
            where = f"layer {layer}" if layer is not None else "unknown layer"
            notes.append(f"not fused: {where}: attention core at MatMul '{node.name}': {cand.reason}")
        return notes

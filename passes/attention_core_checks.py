"""The facts an attention core must have to become one ``Attention``, one named predicate each.

The rule ``attention-core`` (``attention.py``) matches the arithmetic of a
core; whether the matched core *is* an ``Attention`` is a list of facts
about its operands, constants and mask. Each predicate below checks one of
them and returns ``None`` when it holds, or a sentence saying what does not
hold -- that sentence is the near miss reported for the core's layer
("which layer, which check failed"), so the first predicate that fails
names the check. A predicate that proves a value the replacement needs
writes it into the match under a documented key.

The predicates run in the order :func:`passes.attention.check_core` lists
them; the order is part of the behaviour (it decides which check a core
that fails several is reported under).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
from qgraph_passes.attention_dims import dim_of
from qgraph_passes.attention_masks import fill_needs_clamp, safe_fill
from qgraph_passes.attention_operands import peel_key_transpose, peel_repeat_kv, peel_scale, scalar_constant

from qgraph.rewrite import Match

__all__ = [
    "casts_keep_the_dtype",
    "core_located",
    "layer_of",
    "mask_has_an_attention_form",
    "mask_plan",
    "mask_spans_queries_and_keys",
    "operands_are_4d_float",
    "operands_before_scale_transpose_and_repeat_kv",
    "query_heads_group_kv_heads",
    "scalar",
    "scores_scale",
    "scores_scale_is_a_scalar",
    "softcap_is_a_positive_scalar",
]

_LAYER = re.compile(r"(?:^|[./_ ])(?:layers|layer|h|blocks|block)[._](\d+)(?=[./_ ]|$)")


def layer_of(node: ir.Node) -> str | None:
    """The layer index named by the exporter's scopes (TorchScript names, dynamo metadata)."""
    for text in (node.metadata_props.get("pkg.torch.onnx.name_scopes", ""), node.name or ""):
        found = _LAYER.findall(text)
        if found:
            return found[-1]
    return None


def is_float(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()


def rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def scalar(name: str, array) -> float | str:
    """A one-element constant as a float (an absent one is 1), or why it is not one."""
    if array is None:
        return 1.0
    if array.size != 1:
        return f"{name} has {array.size} elements, not one"
    return float(array.reshape(-1)[0])


# -- constants of the core ------------------------------------------------------------


def casts_keep_the_dtype(q: ir.Value, v: ir.Value, casts: Iterable[int | None]) -> str | None:
    """Casts around the Softmax only restate Q's and V's one dtype.

    Why: ``Attention`` computes the softmax in its inputs' dtype; a Cast that
    moves it to another precision (fp16 scores softmaxed in fp32) would be
    lost in the fused node.
    """
    dtypes = {int(x.dtype) for x in (q, v) if x.dtype is not None}
    casts = {c for c in casts if c is not None}
    if casts and (len(dtypes) != 1 or casts != dtypes):
        return f"Casts around the Softmax change the dtype (to {sorted(casts)}, operands {sorted(dtypes)})"
    return None


def scores_scale(qk_scaling: int, qk_scale, qk_divisor) -> float | str:
    """The factor the scores are multiplied by (alternative 0) or divided by (1), or 1."""
    if qk_scaling == 0:
        return scalar("the scores' scale", qk_scale)
    if qk_scaling == 1:
        divisor = scalar("the scores' divisor", qk_divisor)
        return divisor if isinstance(divisor, str) else (1.0 / divisor if divisor else "the scores are divided by 0")
    return 1.0


def scores_scale_is_a_scalar(match: Match, qk_scaling: int, qk_scale, qk_divisor) -> str | None:
    """The scores are scaled by one constant factor (``match["scale"]``, before Q's and K's own).

    Why: ``Attention`` carries the scale as one float attribute.
    """
    factor = scores_scale(qk_scaling, qk_scale, qk_divisor)
    if isinstance(factor, str):
        return factor
    match["scale"] = factor
    return None


def softcap_is_a_positive_scalar(match: Match, softcapping: int, cap) -> str | None:
    """A soft-cap ``tanh(x / c) * c`` uses one positive constant c (``match["softcap"]``, None without one).

    Why: ``Attention``'s ``softcap`` attribute is one float, and 0 means "no cap".
    """
    softcap = 0.0
    if softcapping == 0:
        softcap = scalar("the soft-cap", cap)
        if isinstance(softcap, str):
            return softcap
        if softcap <= 0:
            return f"soft-cap {softcap} is not positive"
    match["softcap"] = softcap or None
    return None


# -- Q, K and V -----------------------------------------------------------------------


def operands_before_scale_transpose_and_repeat_kv(match: Match, q: ir.Value, kt: ir.Value, v: ir.Value) -> str | None:
    """Q, K and V as the exporter made them: scales, K's transpose and repeat_kv peeled off, each proven.

    Why: ``Attention`` takes K and V once per kv head (GQA is kv_num_heads <
    q_num_heads, so the exporter's repeat_kv must go, with the same count
    for K and V) and K untransposed; every scalar factor peeled on the way
    joins ``match["scale"]``. Writes ``query``, ``key``, ``value_`` and
    ``key_format`` ("BHSD", or "BSHD" for a key transposed from [B, T, H, D],
    which the replacement transposes back -- supported without repeat_kv only).
    """
    query, q_scale = peel_scale(q)
    kt_inner, kt_scale = peel_scale(kt)
    key = peel_key_transpose(kt_inner)
    if isinstance(key, str):
        return key
    k_rep, k_scale = peel_scale(key.value)
    repeated = peel_repeat_kv(k_rep)
    if isinstance(repeated, str):
        return repeated
    k, n_rep = (k_rep, 1) if repeated is None else repeated
    k, k_scale2 = peel_scale(k) if repeated is not None else (k, 1.0)
    repeated_v = peel_repeat_kv(v)
    if isinstance(repeated_v, str):
        return repeated_v
    value, v_rep = (v, 1) if repeated_v is None else repeated_v
    if v_rep != n_rep:
        return f"K is repeated {n_rep}x but V {v_rep}x"
    if key.key_format == "BSHD" and n_rep != 1:
        return "a [B, T, H, D] key with repeat_kv is not supported"
    match["query"], match["key"], match["value_"] = query, k, value
    match["key_format"] = key.key_format
    match["scale"] = float(match["scale"] * q_scale * kt_scale * k_scale * k_scale2)
    return None


def operands_are_4d_float(match: Match) -> str | None:
    """Q, K and V are 4-D float tensors of known rank.

    Why: the canonical form is ``Attention`` on 4-D BHSD inputs (head counts
    read from the shapes); a 3-D input would need head counts the core does
    not state.
    """
    for name, x in (("Q", match["query"]), ("K", match["key"]), ("V", match["value_"])):
        r = rank(x)
        if r is None:
            return f"rank of {name} ('{x.name}') is unknown"
        if r != 4:
            return f"{name} ('{x.name}') is {r}-D, not 4-D"
        if not is_float(x):
            return f"{name} ('{x.name}') is not a float tensor"
    return None


def query_heads_group_kv_heads(match: Match) -> str | None:
    """Static head counts divide: each kv head serves a whole group of query heads (``match["heads"]``).

    Why: ``Attention`` groups query heads evenly over kv heads; the counts
    become ``q_num_heads``/``kv_num_heads`` when both are static (``None``
    otherwise: onnxruntime reads them from the shapes).
    """
    heads_q = dim_of(match["query"], 1)
    heads_kv = dim_of(match["key"], 2 if match["key_format"] == "BSHD" else 1)
    if isinstance(heads_q, int) and isinstance(heads_kv, int):
        if heads_q % heads_kv:
            return f"{heads_q} query heads are not a multiple of {heads_kv} kv heads"
        match["heads"] = (heads_q, heads_kv)
    else:
        match["heads"] = None
    return None


# -- the mask ---------------------------------------------------------------------------


def _mask_fill_plan(mask: ir.Value, dtype: np.dtype):
    """How an additive mask must be adjusted for onnxruntime (see attention_masks)."""
    node = mask.producer()
    if node is not None and node.op_type == "Where":
        a, b = scalar_constant(node.inputs[1]), scalar_constant(node.inputs[2])
        if a is not None and b is not None:
            if not (fill_needs_clamp(a, dtype) or fill_needs_clamp(b, dtype)):
                return None
            return ("rewhere", node.inputs[0], safe_fill(a, dtype), safe_fill(b, dtype))
    return ("clamp",)


def mask_plan(masking: int, mask, keep, fill, dtype: np.dtype):
    """How the exporter's mask becomes the Attention's (additive, Where or none), or why it cannot."""
    if masking == 0:
        if mask.dtype is not None and not mask.dtype.is_floating_point():
            return f"additive mask '{mask.name}' is {mask.dtype}"
        return ("additive", mask, _mask_fill_plan(mask, dtype))
    if masking == 1:
        fill_value = scalar("the masked fill", fill)
        if isinstance(fill_value, str):
            return fill_value
        if not np.isneginf(fill_value) and fill_value > -1e4:
            return f"Where fills masked scores with {fill_value}, not a large negative value"
        return ("where", keep, fill_value)
    if masking == 3:
        fill_value = scalar("the masked fill", fill)
        if isinstance(fill_value, str):
            return fill_value
        if mask.dtype is not None and not mask.dtype.is_floating_point():
            return f"additive mask '{mask.name}' is {mask.dtype}"
        if not np.isneginf(fill_value) and fill_value > -1e4:
            return f"Where fills masked scores with {fill_value}, not a large negative value"
        return ("where-then-add", keep, (fill_value, mask))
    return None


def mask_spans_queries_and_keys(mask: ir.Value, query: ir.Value, key: ir.Value, key_format: str) -> bool:
    """The mask's last two dims are provably Q's and K's sequence lengths."""
    if rank(mask) is None or rank(mask) < 2:
        return False
    t_axis = 1 if key_format == "BSHD" else 2
    return dim_of(mask, -2) == dim_of(query, 2) and dim_of(mask, -1) == dim_of(key, t_axis)


def mask_has_an_attention_form(match: Match, masking: int, mask, keep, fill) -> str | None:
    """The exporter's mask is a float additive mask or a Where with a large negative fill (``match["mask_plan"]``).

    Why: ``Attention``'s mask input is additive (float) or boolean (True
    attends); a Where filling with a small value is a different function.
    onnxruntime also needs the mask's query axis to be S (a [B, 1, 1, T]
    padding mask is rejected), so ``match["mask_dims_ok"]`` says whether
    the replacement must expand it; a sum of two masks spans when either does.
    """
    query, key, key_format = match["query"], match["key"], match["key_format"]
    plan = mask_plan(masking, mask, keep, fill, query.dtype.numpy())
    if isinstance(plan, str):
        return plan
    match["mask_plan"] = plan
    spans = [mask_spans_queries_and_keys(x, query, key, key_format) for x in (mask, keep) if x is not None]
    match["mask_dims_ok"] = not spans or any(spans)
    return None


# -- where the core is -------------------------------------------------------------------


def core_located(match: Match) -> None:
    """Record the core's layer and scope (``match["layer"]``, ``match["scope"]``); never fails.

    Why: the fused node carries them, so a report, a diverging tensor or
    the kv-cache pass can name the layer.
    """
    softmax = next(n for n in match.nodes if n.op_type == "Softmax")
    match["layer"] = layer_of(softmax) or layer_of(match.root)
    match["scope"] = softmax.metadata_props.get("namespace") or softmax.name or match.root.name or ""
    return None

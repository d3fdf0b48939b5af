"""The named predicates of the attention-core rule, each on its own: what it accepts, what it names when it fails.

A predicate writes what it proves into the match; a plain dict stands in for
the match here, so each fact is checked without running the matcher.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
from builders import parse
from hypothesis import given, settings
from hypothesis import strategies as st
from qgraph_passes.attention_core_checks import (
    casts_keep_the_dtype,
    mask_has_an_attention_form,
    operands_are_4d_float,
    operands_before_scale_transpose_and_repeat_kv,
    query_heads_group_kv_heads,
    scores_scale_is_a_scalar,
    softcap_is_a_positive_scalar,
)

HEADER = '<ir_version: 11, opset_import: ["" : 23]>\n'
FLOAT, FLOAT16 = int(ir.DataType.FLOAT), int(ir.DataType.FLOAT16)


def _values(body: str, inputs: str, outputs: str) -> dict[str, ir.Value]:
    model = parse(HEADER + f"g ({inputs}) => ({outputs}) {{\n{body}\n}}")
    ir.passes.common.ShapeInferencePass()(model)  # as the attention pass runs it on an export
    values = {v.name: v for v in model.graph.inputs}
    values.update({v.name: v for node in model.graph for v in node.outputs})
    return values


def _repeat_kv(x: str, out: str, n: int = 2, heads: int = 2) -> str:
    """HF's repeat_kv as exported: [B, heads, T, 8] -> [B, heads*n, T, 8]."""
    return f"""
        {x}_ax = Constant <value = int64[1] {{2}}> ()
        {x}_u = Unsqueeze ({x}, {x}_ax)
        {x}_e = Constant <value = int64[5] {{1, 1, {n}, 1, 1}}> ()
        {x}_x = Expand ({x}_u, {x}_e)
        {x}_r = Constant <value = int64[4] {{0, {heads * n}, -1, 8}}> ()
        {out} = Reshape ({x}_x, {x}_r)
    """


GQA = f"""
    k8 = Constant <value = float {{0.125}}> ()
    kk = Mul (k, k8)
    {_repeat_kv("kk", "kr")}
    {_repeat_kv("v", "vr")}
    kt = Transpose <perm = [0, 1, 3, 2]> (kr)
    qs = Constant <value = float {{0.5}}> ()
    q2 = Mul (q, qs)
    ks = Constant <value = float {{4.0}}> ()
    kt2 = Div (kt, ks)
"""
GQA_INPUTS = "float[B, 4, S, 8] q, float[B, 2, T, 8] k, float[B, 2, T, 8] v"


def test_casts_may_only_restate_the_operands_dtype():
    v = _values("y = Identity (q)", "float[B, 4, S, 8] q, float[B, 4, T, 8] v", "float[B, 4, S, 8] y")
    assert casts_keep_the_dtype(v["q"], v["v"], (None, None, None)) is None
    assert casts_keep_the_dtype(v["q"], v["v"], (FLOAT, FLOAT, None)) is None
    assert "change the dtype" in casts_keep_the_dtype(v["q"], v["v"], (FLOAT16, None, None))


@settings(max_examples=25, deadline=None)
@given(divisor=st.floats(0.125, 64.0), multiply=st.booleans())
def test_the_scores_scale_is_the_factor_or_the_inverse_divisor(divisor, multiply):
    match: dict = {}
    constant = np.array([divisor], np.float32)
    alternative = 0 if multiply else 1
    assert scores_scale_is_a_scalar(match, alternative, constant, constant) is None
    expected = float(constant[0]) if multiply else 1.0 / float(constant[0])
    assert match["scale"] == expected


def test_a_scores_scale_that_is_not_one_number_is_named():
    match: dict = {}
    assert scores_scale_is_a_scalar(match, 2, None, None) is None and match["scale"] == 1.0
    assert "2 elements" in scores_scale_is_a_scalar({}, 0, np.ones(2, np.float32), None)
    assert "divided by 0" in scores_scale_is_a_scalar({}, 1, None, np.zeros(1, np.float32))


def test_a_softcap_must_be_one_positive_number():
    match: dict = {}
    assert softcap_is_a_positive_scalar(match, 0, np.float32(30.0)) is None and match["softcap"] == 30.0
    assert softcap_is_a_positive_scalar(match, 1, None) is None and match["softcap"] is None
    assert "not positive" in softcap_is_a_positive_scalar({}, 0, np.float32(-1.0))
    assert "3 elements" in softcap_is_a_positive_scalar({}, 0, np.ones(3, np.float32))


def test_gqa_operands_are_taken_before_repeat_kv_with_every_scale_joined():
    v = _values(GQA + "y = Identity (q)", GQA_INPUTS, "float[B, 4, S, 8] y")
    match: dict = {"scale": 2.0}
    assert operands_before_scale_transpose_and_repeat_kv(match, v["q2"], v["kt2"], v["vr"]) is None
    assert match["query"] is v["q"] and match["key"] is v["k"] and match["value_"] is v["v"]
    assert match["key_format"] == "BHSD"
    assert match["scale"] == 2.0 * 0.5 * 0.25 * 0.125


def test_k_and_v_repeated_differently_are_named():
    v = _values(GQA + "y = Identity (q)", GQA_INPUTS, "float[B, 4, S, 8] y")
    reason = operands_before_scale_transpose_and_repeat_kv({"scale": 1.0}, v["q"], v["kt"], v["v"])
    assert reason == "K is repeated 2x but V 1x"


def test_a_key_that_is_not_transposed_is_named():
    v = _values("kt = Relu (k)\ny = Identity (q)", "float[B, 4, S, 8] q, float[B, 4, 8, T] k", "float[B, 4, S, 8] y")
    reason = operands_before_scale_transpose_and_repeat_kv({"scale": 1.0}, v["q"], v["kt"], v["q"])
    assert "not a transpose" in reason and "Relu" in reason


def test_a_bshd_key_behind_repeat_kv_is_refused():
    v = _values(_repeat_kv("k", "kr") + "kt = Transpose <perm = [0, 2, 3, 1]> (kr)\n" + _repeat_kv("v", "vr"),
                GQA_INPUTS, "float[B, 8, 4, T] kt")
    reason = operands_before_scale_transpose_and_repeat_kv({"scale": 1.0}, v["q"], v["kt"], v["vr"])
    assert reason == "a [B, T, H, D] key with repeat_kv is not supported"


@pytest.mark.parametrize(("q_type", "why"), [
    ("float[B, 4, S, 8]", None),
    ("float[B, S, 32]", "is 3-D, not 4-D"),
    ("int64[B, 4, S, 8]", "is not a float tensor"),
])
def test_operands_must_be_4d_floats(q_type, why):
    v = _values("y = Identity (q)", f"{q_type} q, float[B, 4, T, 8] k", f"{q_type} y")
    reason = operands_are_4d_float({"query": v["q"], "key": v["k"], "value_": v["k"]})
    assert reason is None if why is None else why in reason, reason


def test_an_operand_of_unknown_rank_is_named():
    v = _values("y = Identity (q)", "float[B, 4, S, 8] q, float[B, 4, T, 8] k", "float[B, 4, S, 8] y")
    v["k"].shape = None
    assert operands_are_4d_float({"query": v["q"], "key": v["k"], "value_": v["q"]}) == "rank of K ('k') is unknown"


@pytest.mark.parametrize(("q_heads", "kv_heads", "heads", "why"), [
    (9, 3, (9, 3), None),
    (4, 4, (4, 4), None),
    (4, 3, None, "4 query heads are not a multiple of 3 kv heads"),
    ("H", 3, None, None),  # symbolic: onnxruntime reads the counts from the shapes
])
def test_query_heads_must_group_kv_heads(q_heads, kv_heads, heads, why):
    v = _values("y = Identity (q)", f"float[B, {q_heads}, S, 8] q, float[B, {kv_heads}, T, 8] k",
                f"float[B, {q_heads}, S, 8] y")
    match = {"query": v["q"], "key": v["k"], "key_format": "BHSD"}
    assert query_heads_group_kv_heads(match) == why
    if why is None:
        assert match["heads"] == heads


def test_a_bshd_key_has_its_heads_on_axis_2():
    v = _values("y = Identity (q)", "float[B, 4, S, 8] q, float[B, T, 2, 8] k", "float[B, 4, S, 8] y")
    match = {"query": v["q"], "key": v["k"], "key_format": "BSHD"}
    assert query_heads_group_kv_heads(match) is None and match["heads"] == (4, 2)


MASKS = "float[B, 4, S, 8] q, float[B, 4, T, 8] k, float[B, 1, S, T] mask, int64[B, 1, S, T] int_mask, " \
        "bool[B, 1, 1, T] keep_row, bool[B, 1, S, T] keep"


def _mask_match(v) -> dict:
    return {"query": v["q"], "key": v["k"], "key_format": "BHSD"}


def test_an_additive_float_mask_spanning_s_and_t_is_kept_as_it_is():
    v = _values("y = Identity (q)", MASKS, "float[B, 4, S, 8] y")
    match = _mask_match(v)
    assert mask_has_an_attention_form(match, 0, v["mask"], None, None) is None
    assert match["mask_plan"] == ("additive", v["mask"], ("clamp",))
    assert match["mask_dims_ok"] is True


def test_an_integer_additive_mask_is_named():
    v = _values("y = Identity (q)", MASKS, "float[B, 4, S, 8] y")
    reason = mask_has_an_attention_form(_mask_match(v), 0, v["int_mask"], None, None)
    assert reason == "additive mask 'int_mask' is INT64"


@pytest.mark.parametrize(("fill", "why"), [
    (-np.inf, None),
    (np.finfo(np.float32).min, None),
    (-1.0, "not a large negative value"),
    (-100.0, "not a large negative value"),
])
def test_a_where_mask_must_fill_with_a_large_negative_value(fill, why):
    v = _values("y = Identity (q)", MASKS, "float[B, 4, S, 8] y")
    match = _mask_match(v)
    reason = mask_has_an_attention_form(match, 1, None, v["keep"], np.float32(fill))
    assert reason is None if why is None else why in reason, reason
    if why is None:
        assert match["mask_plan"][:2] == ("where", v["keep"])


def test_a_padding_mask_without_the_query_axis_is_marked_for_expansion():
    v = _values("y = Identity (q)", MASKS, "float[B, 4, S, 8] y")
    match = _mask_match(v)
    assert mask_has_an_attention_form(match, 1, None, v["keep_row"], np.float32(-np.inf)) is None
    assert match["mask_dims_ok"] is False
    unmasked = _mask_match(v)
    assert mask_has_an_attention_form(unmasked, 2, None, None, None) is None
    assert unmasked["mask_plan"] is None and unmasked["mask_dims_ok"] is True

"""attention-io: a cached attention layer in the head-split layout becomes RotaryEmbedding x2 + Attention, same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from qgraph_passes.attention_io import RULES

import qgraph
from qgraph.verify.rule_check import check_rule

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layers(draw) -> dict:
    kv = draw(st.sampled_from([1, 2]))
    return {
        "kv_heads": kv,
        "q_heads": kv * draw(st.sampled_from([1, 2, 3])),
        "d": draw(st.sampled_from([4, 8])),
        "rotary": draw(st.booleans()),
        # which channels pair up, and how many of each head's turn (GPT-J: interleaved, half the head)
        "interleaved": draw(st.booleans()),
        "rotary_dim": draw(st.sampled_from([0, 2])),
        "scale": draw(st.sampled_from([None, 0.25])),
        "bool_mask": draw(st.booleans()),
        "qk_used": False,
    }


def _turned(case: dict) -> int:
    """How many channels of each head the rotation turns."""
    return case.get("rotary_dim") or case["d"]


def build(case: dict) -> onnx.ModelProto:
    """What kv-cache (concat style) leaves of one layer: heads split, rotated, cache concatenated, merged back."""
    hq, hkv, d = case["q_heads"], case["kv_heads"], case["d"]
    nodes, inits = [], []

    def shape(name, *dims):
        inits.append(numpy_helper.from_array(np.array(dims, np.int64), name))
        return name

    def heads(x3, h, tag):
        nodes.append(helper.make_node("Reshape", [x3, shape(f"{tag}_shape", 0, 0, h, d)], [f"{tag}_bshd"]))
        nodes.append(helper.make_node("Transpose", [f"{tag}_bshd"], [f"{tag}_bhsd"], perm=[0, 2, 1, 3]))
        if case["rotary"] and tag in ("q", "k"):
            attrs = {"interleaved": 1} if case.get("interleaved") else {}
            if case.get("rotary_dim"):
                attrs["rotary_embedding_dim"] = case["rotary_dim"]
            nodes.append(helper.make_node("RotaryEmbedding", [f"{tag}_bhsd", "cos", "sin"], [f"{tag}_rot"], **attrs))
            return f"{tag}_rot"
        return f"{tag}_bhsd"

    q, k, v = heads("q3", hq, "q"), heads("k3", hkv, "k"), heads("v3", hkv, "v")
    nodes.append(helper.make_node("Concat", ["past_k", k], ["present_k"], axis=2))
    nodes.append(helper.make_node("Concat", ["past_v", v], ["present_v"], axis=2))
    mask_dtype = TensorProto.BOOL if case["bool_mask"] else TensorProto.FLOAT
    nodes.append(helper.make_node("Concat", ["mask_past", "mask_new"], ["mask"], axis=-1))
    attrs = {} if case["scale"] is None else {"scale": case["scale"]}
    att_outputs = ["y", "", "", "qk"] if case["qk_used"] else ["y"]
    nodes.append(helper.make_node("Attention", ["q_rot" if case["rotary"] else "q_bhsd", "present_k", "present_v", "mask"],
                                  att_outputs, **attrs))
    nodes.append(helper.make_node("Transpose", ["y"], ["y_bshd"], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Reshape", ["y_bshd", shape("out_shape", 0, 0, hq * d)], ["out"]))
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q3", f, ["B", "S", hq * d]),
              helper.make_tensor_value_info("k3", f, ["B", "S", hkv * d]),
              helper.make_tensor_value_info("v3", f, ["B", "S", hkv * d]),
              helper.make_tensor_value_info("past_k", f, ["B", hkv, "P", d]),
              helper.make_tensor_value_info("past_v", f, ["B", hkv, "P", d]),
              helper.make_tensor_value_info("mask_past", mask_dtype, ["B", 1, "S", "P"]),
              # the new keys are always visible to themselves (no fully masked row)
              helper.make_tensor_value_info("mask_new", mask_dtype, ["B", 1, "S", "S"])]
    if case["rotary"]:
        inputs += [helper.make_tensor_value_info("cos", f, ["B", "S", _turned(case) // 2]),
                   helper.make_tensor_value_info("sin", f, ["B", "S", _turned(case) // 2])]
    outputs = [helper.make_tensor_value_info("out", f, ["B", "S", hq * d]),
               helper.make_tensor_value_info("present_k", f, ["B", hkv, None, d]),
               helper.make_tensor_value_info("present_v", f, ["B", hkv, None, d])]
    if case["qk_used"]:
        outputs.append(helper.make_tensor_value_info("qk", f, None))
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _feeds_with_visible_diagonal(case: dict, rng: np.random.Generator) -> dict:
    b, s, p, d = 2, 3, 4, case["d"]
    feeds = {
        "q3": rng.standard_normal((b, s, case["q_heads"] * d)), "k3": rng.standard_normal((b, s, case["kv_heads"] * d)),
        "v3": rng.standard_normal((b, s, case["kv_heads"] * d)),
        "past_k": rng.standard_normal((b, case["kv_heads"], p, d)), "past_v": rng.standard_normal((b, case["kv_heads"], p, d)),
    }
    if case["rotary"]:
        angles = rng.uniform(-3, 3, (b, s, _turned(case) // 2))
        feeds |= {"cos": np.cos(angles), "sin": np.sin(angles)}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    visible = rng.random((b, 1, s, p)) < 0.7
    causal = np.tril(np.ones((s, s), bool))[None, None].repeat(b, 0)
    if case["bool_mask"]:
        feeds |= {"mask_past": visible, "mask_new": causal}
    else:
        feeds |= {"mask_past": np.where(visible, 0, -1e4).astype(np.float32),
                  "mask_new": np.where(causal, 0, -np.inf).astype(np.float32)}
    return feeds


@SETTINGS
@given(case=layers(), seed=st.integers(0, 2**16))
def test_a_cached_layer_becomes_rotations_and_one_attention_with_the_same_outputs(case, seed):
    proto = build(case)
    rewritten, report = qgraph.optimize_with_report(ir.from_proto(proto), ["attention-io", "dce"])
    ops = [n.op_type for n in rewritten.graph]
    assert sorted(ops) == sorted(["Attention"] + ["RotaryEmbedding"] * (2 if case["rotary"] else 0) + ["Concat"]), (
        ops, report.passes[-2].notes)  # the Concat left is the test's own mask
    attention = next(n for n in rewritten.graph if n.op_type == "Attention")
    assert attention.attributes["q_num_heads"].value == case["q_heads"]
    assert attention.attributes["kv_num_heads"].value == case["kv_heads"]
    for rotary in (n for n in rewritten.graph if n.op_type == "RotaryEmbedding"):  # on packed heads, same rotation
        assert len(rotary.inputs[0].shape) == 3 and rotary.attributes["num_heads"].value in (case["q_heads"],
                                                                                            case["kv_heads"])
        attrs = {k: a.value for k, a in rotary.attributes.items()}
        assert attrs.get("interleaved", 0) == int(case["interleaved"])
        assert attrs.get("rotary_embedding_dim", 0) == case["rotary_dim"]
    rng = np.random.default_rng(seed)
    from builders import run
    for _ in range(2):
        feeds = _feeds_with_visible_diagonal(case, rng)
        expected, actual = run(proto, feeds), run(rewritten, feeds)
        for name in ("out", "present_k", "present_v"):
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_an_attention_whose_scores_are_used_is_kept_and_the_reason_reported():
    case = {"kv_heads": 1, "q_heads": 2, "d": 4, "rotary": False, "scale": None, "bool_mask": False, "qk_used": True}
    rewritten, report = qgraph.optimize_with_report(ir.from_proto(build(case)), ["attention-io", "dce"])
    ops = [n.op_type for n in rewritten.graph]
    assert ops.count("Transpose") == 4 and ops.count("Concat") == 3
    notes = " ".join(report.passes[-2].notes)
    assert "attention-cache-inputs" in notes and "graph output" in notes, notes


@pytest.mark.parametrize("rule", RULES.rules, ids=lambda r: r.name)
def test_each_rule_holds_on_its_own(rule):
    result = check_rule(rule, examples=2)
    assert result.ok, str(result)

"""attention / lower-attention: exactly the true cores fuse, and every form means the same in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from attention_graphs import Core, build, cores, feeds
from builders import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qgraph_passes.attention import AttentionFusionPass
from qgraph_passes.attention_lowering import LowerAttentionPass
from qgraph_passes.opset_upgrade import OpsetUpgradePass

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _assert_same_numbers(expected: np.ndarray, actual: np.ndarray, what: str) -> None:
    """Equal wherever the original gives a number (a NaN there may become anything)."""
    finite = ~np.isnan(expected)
    assert not np.isnan(actual[finite]).any(), f"{what}: NaN where the original gives a number"
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-4, atol=1e-5, err_msg=what)


@SETTINGS
@given(core=cores(), data=st.data())
def test_exactly_the_true_cores_fuse_and_mean_the_same(core, data):
    proto = build(core)
    model = ir.from_proto(proto)
    fusion = AttentionFusionPass()
    fusion(model)
    attention = [n for n in model.graph if n.op_type == "Attention"]
    if core.broken:
        assert attention == [], f"fused a core that is not attention ({core.broken})"
        assert any(note.startswith("not fused: layer 0") for note in fusion.report.notes), fusion.report.notes
    else:
        assert len(attention) == 1 and "Softmax" not in _ops(model), _ops(model)
        node = attention[0]
        assert node.attributes["scale"].as_float() == np.float32(core.scale) or np.isclose(
            node.attributes["scale"].as_float(), core.scale, rtol=1e-5)
        assert node.inputs[1].name == "K" and node.inputs[2].name == "V", "K/V not taken before repeat_kv"
        assert node.metadata_props.get("qgraph.layer") == "0"
    fused = ir.to_proto(model)
    feed = data.draw(feeds(core))
    expected = run(proto, feed)["Y"]
    _assert_same_numbers(expected, run(fused, feed)["Y"], "fused")
    if not core.broken:
        lowered = ir.from_proto(fused)
        assert LowerAttentionPass(to="primitive")(lowered).modified
        assert "Attention" not in _ops(lowered) and "Trilu" not in _ops(lowered)
        _assert_same_numbers(expected, run(ir.to_proto(lowered), feed)["Y"], "lowered to primitive")


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(core=cores(broken=False), data=st.data())
def test_primitive_lowering_is_valid_at_opset_17(core, data):
    model = ir.from_proto(build(core))
    AttentionFusionPass()(model)
    LowerAttentionPass(to="primitive")(model)
    OpsetUpgradePass(target=17)(model)  # raises if any op of the lowering does not exist at 17
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    feed = data.draw(feeds(core))
    _assert_same_numbers(run(build(core), feed)["Y"], run(proto, feed)["Y"], "opset 17")


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(core=cores(broken=False), data=st.data())
def test_mha_lowering_where_the_contrib_op_can_express_the_node(core, data):
    model = ir.from_proto(build(core))
    AttentionFusionPass()(model)
    lowering = LowerAttentionPass(to="mha")
    lowering(model)
    ops = _ops(model)
    if core.heads == core.kv_heads and not core.softcap:
        assert "MultiHeadAttention" in ops and "Attention" not in ops
    else:
        assert "Attention" in ops and any("kept Attention" in n for n in lowering.report.notes)
    feed = data.draw(feeds(core))
    _assert_same_numbers(run(build(core), feed)["Y"], run(ir.to_proto(model), feed)["Y"], "mha")


def test_gqa_lowering_keeps_the_node_and_says_why():
    model = ir.from_proto(build(Core(4, 2, 8, 0.25, "qk-mul", "direct", "additive-inf", True, None, None)))
    AttentionFusionPass()(model)
    lowering = LowerAttentionPass(to="gqa")
    assert not lowering(model).modified
    assert "Attention" in _ops(model)
    assert any("GroupQueryAttention is not implemented" in n for n in lowering.report.notes)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(core=cores(broken=False), data=st.data())
def test_an_exported_attention_behind_repeat_kv_takes_k_and_v_directly(core, data):
    from attention_graphs import _Graph, _repeat

    g = _Graph()
    k, v = _repeat(g, "K", core), _repeat(g, "V", core)
    inputs = ["Q", k, v] + (["keep"] if core.mask == "bool-where" else [])
    g.nodes.append(onnx.helper.make_node("Attention", inputs, ["Y"], name="/layers.0/attn/sdpa",
                                         scale=core.scale))
    proto = build(core)
    del proto.graph.node[:]
    proto.graph.node.extend(g.nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(g.inits)
    if core.mask not in ("none", "bool-where"):
        del proto.graph.input[3:]
    model = ir.from_proto(proto)
    fusion = AttentionFusionPass()
    fusion(model)
    attention = [n for n in model.graph if n.op_type == "Attention"]
    assert len(attention) == 1
    assert [x.name for x in attention[0].inputs[1:3]] == ["K", "V"]
    assert {"Expand", "Unsqueeze"}.isdisjoint(_ops(model))
    feed = data.draw(feeds(core))
    if core.mask not in ("none", "bool-where"):
        feed.pop("keep")
    _assert_same_numbers(run(proto, feed)["Y"], run(ir.to_proto(model), feed)["Y"], "absorbed")

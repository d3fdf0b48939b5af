"""attention on batched heads (3-D [B*H, S, D], BLOOM), 4-D biased cores, and position biases folded into the mask."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from attention_batched_graphs import BatchedCore, batched_cores, batched_feeds, build
from builders import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qgraph_passes.attention import AttentionFusionPass

MASK_BIAS = "qgraph.mask_bias"
SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

WHY_NOT = {
    "bias-from-tokens": "input_ids",
    "bias-from-query": "reads float data",
    "mixed-heads": "does not merge the batch and head axes of the query",
    "swapped-scores-view": "does not split the scores' first axis",
}


def _assert_same_numbers(expected: np.ndarray, actual: np.ndarray, what: str) -> None:
    """Equal wherever the original gives a number (a NaN there may become anything)."""
    finite = ~np.isnan(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert not np.isnan(actual[finite]).any(), f"{what}: NaN where the original gives a number"
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-4, atol=1e-5, err_msg=what)


def _bias_is_the_only_term(core: BatchedCore) -> bool:
    """A 4-D core whose only additive term is the bias, right on the (scaled) scores."""
    alone = core.bias == "after-scale" or core.bias == "before-scale" and core.scale_at in ("none", "q")
    return core.layout == "heads" and core.mask == "none" and alone


def _fuse(core: BatchedCore):
    proto = build(core)
    model = ir.from_proto(proto)
    fusion = AttentionFusionPass()
    fusion(model)
    return proto, model, fusion


@SETTINGS
@given(core=batched_cores(), data=st.data())
def test_batched_heads_cores_fuse_exactly_when_true_and_mean_the_same(core, data):
    proto, model, fusion = _fuse(core)
    attention = [n for n in model.graph if n.op_type == "Attention"]
    ops = [n.op_type for n in model.graph]
    if core.broken and _bias_is_the_only_term(core):
        # The plain rule reads a lone additive term as the exporter's mask (any values are exact
        # there); it must not be taken for a position bias.
        assert all(MASK_BIAS not in n.metadata_props for n in attention), core.broken
    elif core.broken:
        assert attention == [], f"fused a core that is not attention over heads ({core.broken})"
        notes = [n for n in fusion.report.notes if n.startswith("not fused: layer 0")]
        assert len(notes) == 1 and WHY_NOT[core.broken] in notes[0], fusion.report.notes
    else:
        assert len(attention) == 1 and "Softmax" not in ops and "MatMul" not in ops, (ops, fusion.report.notes)
        rule = attention[0].metadata_props.get("qgraph.rule")
        if _bias_is_the_only_term(core):
            # Add(scores, bias) alone reads like a plain core's additive mask: the plain rule takes it,
            # the bias as the mask input (exact either way, but not marked as a position bias).
            assert rule == "attention-core", rule
        else:
            assert rule == ("attention-core-batched-heads" if core.layout == "batched" else "attention-core-biased")
        node = attention[0]
        assert [x.name for x in node.inputs[:3]] == ["Q", "K", "V"], "Q/K/V are not the 4-D BHSD tensors"
        expected_scale = core.scale if core.scale_at != "none" else 1.0
        assert np.isclose(node.attributes["scale"].as_float(), expected_scale, rtol=1e-6)
        assert node.metadata_props.get("qgraph.layer") == "0"
        expected_bias = "position" if core.has_bias and not _bias_is_the_only_term(core) else None
        assert node.metadata_props.get("qgraph.mask_bias") == expected_bias
        if core.has_bias:
            mask = node.inputs[3]
            assert mask.dtype == ir.DataType.FLOAT, "a biased mask must be float additive"
    feed = data.draw(batched_feeds(core, proto))
    _assert_same_numbers(run(proto, feed)["Y"], run(ir.to_proto(model), feed)["Y"], f"fused {core}")


@pytest.mark.parametrize("scale_at", ["qk-mul", "qk-div"])
@pytest.mark.parametrize("mask", ["additive-min", "bool-where-inf", "none"])
@pytest.mark.parametrize("layout", ["batched", "heads"])
def test_a_bias_before_the_scale_is_scaled_and_one_after_it_is_not(scale_at, mask, layout):
    """Same graph but for where the bias sits: each fused graph follows its placement (scale 0.3 != 1)."""
    common = dict(heads=2, head_dim=4, scale=0.3, scale_at=scale_at, bias_from="shapes", mask=mask, causal=True,
                  views="dynamo", layout=layout, guard=False, casts=False, broken=None)
    rng = np.random.default_rng(1)
    feed = {"Q": rng.normal(size=(2, 2, 3, 4)).astype(np.float32), "K": rng.normal(size=(2, 2, 5, 4)).astype(np.float32),
            "V": rng.normal(size=(2, 2, 5, 4)).astype(np.float32),
            "attention_mask": np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], np.int64)}
    originals = {}
    for bias in ("before-scale", "after-scale"):
        proto, model, _ = _fuse(BatchedCore(bias=bias, **common))
        assert any(n.op_type == "Attention" for n in model.graph)
        feeds = {k: v for k, v in feed.items() if k in {x.name for x in proto.graph.input}}
        originals[bias] = run(proto, feeds)["Y"]
        _assert_same_numbers(originals[bias], run(ir.to_proto(model), feeds)["Y"], bias)
    # The placements mean different things, so a fusion that ignored the placement could not pass both.
    assert not np.allclose(originals["before-scale"], originals["after-scale"], atol=1e-4)


def test_a_fully_masked_row_keeps_its_meaning_with_a_bias():
    """finfo.min rows average V uniformly before and after fusion, bias or not."""
    core = BatchedCore(heads=2, head_dim=4, scale=0.5, scale_at="qk-mul", bias="after-scale", bias_from="mask",
                       mask="additive-min", causal=False, views="torchscript", layout="batched", guard=False, casts=False,
                       broken=None)
    proto, model, _ = _fuse(core)
    rng = np.random.default_rng(0)
    feed = {"Q": rng.normal(size=(2, 2, 3, 4)).astype(np.float32), "K": rng.normal(size=(2, 2, 3, 4)).astype(np.float32),
            "V": rng.normal(size=(2, 2, 3, 4)).astype(np.float32),
            "attention_mask": np.array([[0, 0, 0], [1, 1, 0]], np.int64)}
    expected, actual = run(proto, feed)["Y"], run(ir.to_proto(model), feed)["Y"]
    np.testing.assert_allclose(expected[0], np.broadcast_to(feed["V"][0].mean(axis=1, keepdims=True), (2, 3, 4)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_a_shape_only_bias_that_masks_every_key_keeps_the_uniform_rows():
    """A 3-D 'bias' of finfo.min (a mask added before the view) must not become onnxruntime's all-masked zeros."""
    import onnx
    from onnx import helper

    core = BatchedCore(heads=2, head_dim=4, scale=0.5, scale_at="qk-mul", bias="after-scale", bias_from="shapes",
                       mask="none", causal=False, views="dynamo", layout="batched", guard=False, casts=False,
                       broken=None)
    proto = build(core)
    # finfo.min slopes times positions pinned to 1: every key of every row gets exactly the fill.
    slopes = next(init for init in proto.graph.initializer if list(init.dims) == [2, 1])
    slopes.CopyFrom(onnx.numpy_helper.from_array(np.full((2, 1), np.finfo(np.float32).min, np.float32), slopes.name))
    positions = [n for n in proto.graph.node if n.op_type == "Range"]
    assert positions
    ones = helper.make_node("Constant", [], ["one_f"], value=onnx.numpy_helper.from_array(np.float32(1.0)))
    cast = next(n for n in proto.graph.node if n.op_type == "Cast" and n.input[0] == positions[0].output[0])
    proto.graph.node.insert(0, ones)
    cast_index = list(proto.graph.node).index(cast)
    proto.graph.node.insert(cast_index + 1, helper.make_node("Min", [cast.output[0], "one_f"], ["at_most_one"]))
    proto.graph.node.insert(cast_index + 2, helper.make_node("Max", ["at_most_one", "one_f"], ["at_least_one"]))
    for node in proto.graph.node:
        if node.op_type == "Reshape" and node.input[0] == cast.output[0]:
            node.input[0] = "at_least_one"
    model = ir.from_proto(proto)
    AttentionFusionPass()(model)
    assert any(n.op_type == "Attention" for n in model.graph)
    rng = np.random.default_rng(2)
    feed = {"Q": rng.normal(size=(1, 2, 2, 4)).astype(np.float32), "K": rng.normal(size=(1, 2, 3, 4)).astype(np.float32),
            "V": rng.normal(size=(1, 2, 3, 4)).astype(np.float32)}
    expected = run(proto, feed)["Y"]
    np.testing.assert_allclose(expected, np.broadcast_to(feed["V"].mean(axis=2, keepdims=True), expected.shape),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(ir.to_proto(model), feed)["Y"], expected, rtol=1e-5, atol=1e-6)

"""skip-rmsnorm: a residual add feeding RMSNormalization becomes SkipSimplifiedLayerNormalization, both values kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from qgraph_passes.skip_rmsnorm import RULES

import qgraph
from qgraph.verify.rule_check import check_rule

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def residual_norms(draw) -> dict:
    return {
        "hidden": draw(st.sampled_from([4, 8, 16])),
        "rank": draw(st.sampled_from([2, 3])),
        "swap": draw(st.booleans()),  # residual + block or block + residual
        "epsilon": draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        "sum_used": draw(st.booleans()),  # the sum also flows on (the next residual) or not (the final norm)
        # what the kernel cannot take: a broadcasting addend, a norm from an earlier axis, a float64 stash
        "defect": draw(st.sampled_from([None, None, None, "broadcast", "axis", "stash"])),
    }


def build(case: dict) -> onnx.ModelProto:
    h = case["hidden"]
    axis = -2 if case["defect"] == "axis" else -1
    dims = (["B", 3, h] if case["rank"] == 3 else [3, h]) if axis == -2 else (["B", "S", h] if case["rank"] == 3 else ["T", h])
    b_dims = [1, h] if case["defect"] == "broadcast" else dims
    stash = TensorProto.DOUBLE if case["defect"] == "stash" else TensorProto.FLOAT
    scale_shape = [3, h] if axis == -2 else [h]
    scale = numpy_helper.from_array(np.linspace(-2, 2, int(np.prod(scale_shape))).reshape(scale_shape).astype(np.float32), "w")
    add = helper.make_node("Add", ["b", "a"] if case["swap"] else ["a", "b"], ["s"])
    norm = helper.make_node("RMSNormalization", ["s", "w"], ["y"], epsilon=case["epsilon"], axis=axis, stash_type=stash)
    nodes = [add, norm]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)]
    if case["sum_used"]:
        nodes.append(helper.make_node("Mul", ["s", "s"], ["next"]))
        outputs.append(helper.make_tensor_value_info("next", TensorProto.FLOAT, dims))
    graph = helper.make_graph(nodes, "skip", [helper.make_tensor_value_info("a", TensorProto.FLOAT, dims),
                                              helper.make_tensor_value_info("b", TensorProto.FLOAT, b_dims)],
                              outputs, [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


@SETTINGS
@given(case=residual_norms(), data=st.data())
def test_the_kernels_cases_fuse_the_others_are_reported_and_outputs_stay(case, data):
    proto = build(case)
    fused, report = qgraph.optimize_with_report(ir.from_proto(proto), ["skip-rmsnorm"])
    ops = [n.op_type for n in fused.graph]
    notes = report.passes[-1].notes
    if case["defect"] is None:
        assert "SkipSimplifiedLayerNormalization" in ops and "Add" not in ops and "RMSNormalization" not in ops, notes
        node = next(n for n in fused.graph if n.op_type == "SkipSimplifiedLayerNormalization")
        assert node.domain == "com.microsoft"
        assert node.attributes["epsilon"].value == pytest.approx(case["epsilon"])
    else:
        assert ops.count("RMSNormalization") == 1 and "SkipSimplifiedLayerNormalization" not in ops
        assert len(notes) == 1 and "kept" in notes[0], notes
    assert_equivalent(proto, fused, examples=4, rtol=1e-5, atol=1e-5, data=data)


@pytest.mark.parametrize("rule", RULES.rules, ids=lambda r: r.name)
def test_each_rule_holds_on_its_own(rule):
    result = check_rule(rule, examples=2)
    assert result.ok, str(result)

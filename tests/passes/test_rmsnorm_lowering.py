"""lower-rmsnorm on drawn RMSNormalization graphs: what each form can express is lowered, the rest reported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qgraph

FORMS = {
    "custom-rmsnorm": ("com.qti.aisw.onnx", "CustomRMSNorm"),
    "simplified-layer-norm": ("com.microsoft", "SimplifiedLayerNormalization"),
    "primitive": ("", "ReduceMean"),
}


@st.composite
def rms_normalizations(draw: st.DrawFn) -> dict:
    rank = draw(st.integers(2, 4))
    return {
        "rank": rank,
        "hidden": draw(st.sampled_from([4, 8])),
        "axis": draw(st.sampled_from([-1, rank - 1, -2])),
        "dtype": draw(st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT16])),
        "stash_type": draw(st.sampled_from([TensorProto.FLOAT, TensorProto.DOUBLE])),
        "epsilon": draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        "full_scale": draw(st.booleans()),  # scale over the last two dims instead of a 1-D weight
    }


def build(case: dict) -> onnx.ModelProto:
    dims = [f"d{i}" for i in range(case["rank"] - 2)] + [3, case["hidden"]]
    scale_shape = dims[-2:] if case["full_scale"] else dims[-1:]
    np_type = helper.tensor_dtype_to_np_dtype(case["dtype"])
    scale = numpy_helper.from_array(np.linspace(-2, 2, int(np.prod(scale_shape))).reshape(scale_shape).astype(np_type), "scale")
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="norm", epsilon=case["epsilon"],
                            axis=case["axis"], stash_type=case["stash_type"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", case["dtype"], dims)],
                              [helper.make_tensor_value_info("y", case["dtype"], dims)], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def device_op_can_take(case: dict) -> bool:
    """The contract of CustomRMSNorm / SimplifiedLayerNormalization as lowered: float32, last axis, 1-D weight."""
    last_axis = case["axis"] in (-1, case["rank"] - 1)
    return (case["dtype"] == TensorProto.FLOAT and case["stash_type"] == TensorProto.FLOAT
            and last_axis and not case["full_scale"])


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=rms_normalizations(), to=st.sampled_from(sorted(FORMS)), data=st.data())
def test_lowers_what_the_form_can_express_and_keeps_the_outputs(case, to, data):
    model = build(case)
    lowered, report = qgraph.optimize_with_report(model, [("lower-rmsnorm", {"to": to})])
    record = report.passes[-1]
    domain, op_type = FORMS[to]
    expected = to == "primitive" or device_op_can_take(case)
    found = [n for n in lowered.graph.node if n.op_type == op_type and n.domain == domain]
    assert len(found) == (1 if expected else 0), record.notes
    if expected:
        assert record.notes == []
        assert all(n.op_type != "RMSNormalization" for n in lowered.graph.node)
        if domain:
            assert [(f.domain, f.name) for f in lowered.functions] == [(domain, op_type)]
            assert {o.domain: o.version for o in lowered.opset_import}[domain] == 1
    else:
        (note,) = record.notes
        assert note.startswith("RMSNormalization 'norm' kept")
    tol = 2e-2 if case["dtype"] == TensorProto.FLOAT16 else 1e-5
    assert_equivalent(model, lowered, examples=3, data=data, rtol=tol, atol=tol)


def test_custom_rmsnorm_carries_epsilon_as_a_float_and_survives_opset_17():
    case = {"rank": 3, "hidden": 8, "axis": -1, "dtype": TensorProto.FLOAT, "stash_type": TensorProto.FLOAT,
            "epsilon": 1e-6, "full_scale": False}
    model = build(case)
    lowered = qgraph.optimize(model, [("lower-rmsnorm", {"to": "custom-rmsnorm"}), ("opset-upgrade", {"target": 17})])
    (node,) = lowered.graph.node
    assert (node.domain, node.op_type, list(node.input)) == ("com.qti.aisw.onnx", "CustomRMSNorm", ["x", "scale"])
    (attr,) = node.attribute
    assert attr.name == "epsilon" and attr.type == onnx.AttributeProto.FLOAT and np.isclose(attr.f, 1e-6)
    assert {o.domain: o.version for o in lowered.opset_import}[""] == 17
    (function,) = lowered.functions
    assert {o.domain: o.version for o in function.opset_import}[""] == 17
    onnx.checker.check_model(lowered, full_check=True)
    assert_equivalent(model, lowered, examples=10)


@pytest.mark.parametrize("to", sorted(FORMS))
def test_unknown_lowering_target_is_rejected(to):
    with pytest.raises(qgraph.errors.BadInputError, match="not one of"):
        qgraph.optimize(build({"rank": 3, "hidden": 4, "axis": -1, "dtype": TensorProto.FLOAT,
                               "stash_type": 1, "epsilon": 1e-5, "full_scale": False}),
                        [("lower-rmsnorm", {"to": to + "-x"})])

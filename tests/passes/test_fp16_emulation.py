"""fp16-emulate: onnxruntime on the CPU computes what a graph converted to fp16 would store."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from fp16_graphs import F32, round_fp16, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from qgraph_passes.fp16_emulation import FP16EmulationPass

from qgraph import io as qio
from qgraph.invariants import find_violations
from qgraph.verify.fp16 import check_fp16, compare_fp16, saturated

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
_OPS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _chain_model(steps: list[tuple[str, float]]) -> ir.Model:
    """``y = (((x op0 c0) op1 c1) ...)`` with the constants as initializers."""
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape(["N"]))
    nodes, inits, current = [], [], x
    for i, (op, constant) in enumerate(steps):
        c = ir.Value(name=f"c{i}", type=ir.TensorType(F32), shape=ir.Shape([]),
                     const_value=ir.tensor(np.array(constant, dtype=np.float32), name=f"c{i}"))
        inits.append(c)
        node = ir.node(op, [current, c], name=f"step{i}")
        node.outputs[0].name = f"t{i}"
        node.outputs[0].dtype, node.outputs[0].shape = F32, ir.Shape(["N"])
        nodes.append(node)
        current = node.outputs[0]
    current.name = "y"
    graph = ir.Graph([x], [current], nodes=nodes, initializers=inits, opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


@SETTINGS
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(sorted(_OPS)), st.floats(-70000, 70000, width=32).filter(lambda v: v != 0)),
        min_size=1, max_size=5,
    ),
    x=hnp.arrays(np.float32, st.integers(1, 8), elements=st.floats(-1e5, 1e5, width=32)),
)
def test_every_tensor_is_rounded_through_fp16_after_each_op(steps, x):
    model = _chain_model(steps)
    emulate = FP16EmulationPass()
    assert emulate(model).modified
    assert not find_violations(model)

    expected = round_fp16(x)  # the device receives fp16 inputs
    with np.errstate(all="ignore"):
        for op, constant in steps:
            expected = round_fp16(_OPS[op](expected, round_fp16(np.float32(constant))))
    actual = run(model, {"x": x})["y"]
    np.testing.assert_array_equal(actual, expected)


def test_names_types_and_a_second_run():
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([3]))
    shape = ir.node("Shape", [x], name="shape")
    shape.outputs[0].name = "x_shape"
    scaled = ir.node("Mul", [x, x], name="square")
    scaled.outputs[0].name = "y"
    scaled.outputs[0].dtype, scaled.outputs[0].shape = F32, ir.Shape([3])
    shape.outputs[0].dtype, shape.outputs[0].shape = ir.DataType.INT64, ir.Shape([1])
    model = ir.Model(ir.Graph([x], [scaled.outputs[0], shape.outputs[0]], nodes=[shape, scaled],
                              opset_imports={"": 18}, name="g"), ir_version=10)
    emulate = FP16EmulationPass()
    emulate(model)
    assert [v.name for v in model.graph.outputs] == ["y", "x_shape"]
    assert model.graph.outputs[0].producer().op_type == "Cast"  # the output carries the rounded tensor
    assert model.graph.outputs[1].producer() is shape  # int64 is not rounded
    assert emulate.report.rule_matches == {"tensors-rounded": 2}  # x and y
    nodes = len(model.graph)
    assert not FP16EmulationPass()(model).modified
    assert len(model.graph) == nodes
    out = run(model, {"x": np.array([300.0, 255.9, -1.0], np.float32)})
    # 300**2 overflows; 255.9 is stored as 255.875, whose square 65472.02 is stored as 65472
    np.testing.assert_array_equal(out["y"], [np.inf, 65472.0, 1.0])
    np.testing.assert_array_equal(out["x_shape"], [3])


def _if_model() -> ir.Model:
    cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([4]))
    three = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(3.0001, np.float32))}, name="three")
    three.outputs[0].name = "three"
    mul = ir.node("Mul", [x, three.outputs[0]], name="inner_mul")  # reads x from the outer graph
    mul.outputs[0].name = "inner"
    add = ir.node("Add", [mul.outputs[0], mul.outputs[0]], name="inner_add")
    add.outputs[0].name = "branch_out"
    for v, dtype in ((three.outputs[0], F32), (mul.outputs[0], F32), (add.outputs[0], F32)):
        v.dtype = dtype
    then_g = ir.Graph([], [add.outputs[0]], nodes=[three, mul, add], name="then_branch")
    neg = ir.node("Neg", [x], name="else_neg")
    neg.outputs[0].name = "else_out"
    neg.outputs[0].dtype = F32
    else_g = ir.Graph([], [neg.outputs[0]], nodes=[neg], name="else_branch")
    branch = ir.node("If", [cond], attributes={"then_branch": then_g, "else_branch": else_g}, name="if")
    branch.outputs[0].name = "y"
    branch.outputs[0].dtype, branch.outputs[0].shape = F32, ir.Shape([4])
    return ir.Model(ir.Graph([cond, x], [branch.outputs[0]], nodes=[branch], opset_imports={"": 18}, name="g"), ir_version=10)


@SETTINGS
@given(x=hnp.arrays(np.float32, 4, elements=st.floats(-2e4, 2e4, width=32)))
def test_values_inside_if_branches_are_rounded(x):
    model = _if_model()
    FP16EmulationPass()(model)
    assert not find_violations(model)
    actual = run(model, {"cond": np.array(True), "x": x})["y"]
    with np.errstate(over="ignore"):
        inner = round_fp16(round_fp16(x) * round_fp16(np.float32(3.0001)))
        expected = round_fp16(round_fp16(inner + inner))
    np.testing.assert_array_equal(actual, expected)


@SETTINGS
@given(x=hnp.arrays(np.float32, 3, elements=st.floats(-100, 100, width=32)))
def test_a_function_is_one_kernel_only_its_result_is_rounded(x):
    """Inside a model-local function (a custom op's body) values keep fp32; the call's output is rounded."""
    fx = ir.Value(name="fx", type=ir.TensorType(F32), shape=ir.Shape([3]))
    big = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(1000.0, np.float32))}, name="big")
    up = ir.node("Mul", [fx, big.outputs[0]], name="up")  # x*1000*1000 overflows fp16, not fp32
    up2 = ir.node("Mul", [up.outputs[0], big.outputs[0]], name="up2")
    down = ir.node("Div", [up2.outputs[0], big.outputs[0]], name="down")
    down2 = ir.node("Div", [down.outputs[0], big.outputs[0]], name="down2")
    body = ir.Graph([fx], [down2.outputs[0]], nodes=[big, up, up2, down, down2], opset_imports={"": 18})
    function = ir.Function("test.fp16", "RoundTrip", "", graph=body, attributes=[])
    x_in = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([3]))
    call = ir.node("RoundTrip", [x_in], domain="test.fp16", name="call")
    call.outputs[0].name = "y"
    call.outputs[0].dtype, call.outputs[0].shape = F32, ir.Shape([3])
    model = ir.Model(ir.Graph([x_in], [call.outputs[0]], nodes=[call], opset_imports={"": 18, "test.fp16": 1}, name="g"),
                     ir_version=10, functions=[function])
    FP16EmulationPass()(model)
    assert all(n.op_type != "Cast" for n in function)
    actual = run(model, {"x": x})["y"]
    expected = round_fp16(round_fp16(x) * np.float32(1e6) / np.float32(1e6))
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
    assert np.isfinite(actual).all()


def test_saturated_values_agree_with_what_they_replace():
    reference = {"y": np.array([-np.inf, -3.4e38, 70000.0, 1.0, np.inf], np.float32)}
    clipped = {"y": np.array([-65504.0, -65504.0, 65504.0, 1.0, 65504.0], np.float16)}
    np.testing.assert_array_equal(saturated(reference["y"], clipped["y"]), [True, True, True, False, True])
    assert compare_fp16(reference, clipped).passed
    wrong_sign = {"y": np.array([65504.0, -65504.0, 65504.0, 1.0, 65504.0], np.float16)}
    assert not compare_fp16(reference, wrong_sign).passed
    not_saturated = {"y": np.array([-65504.0, -65504.0, 65504.0, 1.0, 60000.0], np.float32)}
    assert not compare_fp16(reference, not_saturated).passed


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_real_export_runs_emulated_and_stays_close_to_fp32(tiny_zoo, exporter):
    """llama's TorchScript export carries no intermediate types: shape inference supplies them."""
    model = qio.load(tiny_zoo.export("llama", exporter).model_path)
    emulate = FP16EmulationPass()
    emulated = model.clone()
    emulate(emulated)
    assert not any("unknown type" in note for note in emulate.report.notes), emulate.report.notes
    for node in emulated.graph:
        if node.metadata_props.get("qgraph.pass") == "fp16-emulate":
            continue
        for value in node.outputs:
            assert value.dtype is not None, value.name
            readers = [u.node for u in value.uses()]
            if value.dtype == ir.DataType.FLOAT and readers:  # read only through the fp16 round trip
                assert [r.op_type for r in readers] == ["Cast"], value.name
                assert readers[0].attributes["to"].value == ir.DataType.FLOAT16
    from qgraph.verify import InputOptions

    result = check_fp16(model, examples=6, options=InputOptions(padding="none"))
    assert result.equivalent, str(result)

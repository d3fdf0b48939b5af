"""attach_function: a custom op with a body onnxruntime runs, at the model's opset."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
import pytest
from onnxscript import opset18 as op

from qgraph.custom_ops import attach_function, function_from_script
from qgraph.errors import BadInputError

_DOMAIN = "com.example.test"
_custom = onnxscript.values.Opset(_DOMAIN, 1)


@onnxscript.script(_custom, default_opset=op)
def SumSquares(x):
    """Sum of squares over the last axis: ReduceSum takes axes as an input from opset 13 on."""
    return op.ReduceSum(op.Mul(x, x), op.Constant(value_ints=[-1]), keepdims=1)


@onnxscript.script(_custom, default_opset=op)
def MeanSquares(x):
    """ReduceMean with an axes input exists only from opset 18 on."""
    return op.ReduceMean(op.Mul(x, x), op.Constant(value_ints=[-1]), keepdims=1)


def _model_calling(function: ir.Function, opset: int) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    node = ir.Node(function.domain, function.name, [x], num_outputs=1)
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape([2, 1])
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": opset}, name="g")
    return ir.Model(graph, ir_version=8)


@pytest.mark.parametrize("opset", [13, 17, 23])
def test_attached_body_runs_in_onnxruntime_at_the_model_opset(opset: int) -> None:
    function = function_from_script(SumSquares)
    model = _model_calling(function, opset)
    attach_function(model, function)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert model.opset_imports[_DOMAIN] == 1
    assert function.opset_imports[""] == opset
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, (x * x).sum(-1, keepdims=True))


def test_attaching_twice_keeps_one_function() -> None:
    model = _model_calling(function_from_script(SumSquares), 17)
    first = attach_function(model, function_from_script(SumSquares))
    second = attach_function(model, function_from_script(SumSquares))
    assert second is first
    assert len(model.functions) == 1


def test_a_body_using_an_op_missing_at_the_model_opset_is_refused() -> None:
    function = function_from_script(MeanSquares)
    model = _model_calling(function, 17)
    with pytest.raises(BadInputError, match=r"MeanSquares.*ReduceMean.*opset 18.*opset 17"):
        attach_function(model, function)
    assert not model.functions
    assert _DOMAIN not in model.opset_imports

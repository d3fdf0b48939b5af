"""Function bodies of the ops RMSNormalization is lowered to, so onnxruntime can run them.

A body must stay valid when the qaic preset later converts the model down to
opset 17 (``qgraph.custom_ops`` re-targets a body only if every op in it is
written the same way at both versions). ReduceMean moved its axes from an
attribute to an input at opset 18 and Cast gained ``saturate`` at 19, so the
bodies use neither: the mean is ReduceSum (axes input since 13) divided by a
ReduceSum of ones, and everything is computed in float32 -- the only dtype the
bodies are written for, as the device op's reference is.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import FLOAT, script
from onnxscript import opset17 as op
from onnxscript.values import Opset

from qgraph.custom_ops import function_from_script

__all__ = ["CUSTOM_RMSNORM_DOMAIN", "MICROSOFT_DOMAIN", "custom_rms_norm", "simplified_layer_norm"]

CUSTOM_RMSNORM_DOMAIN = "com.qti.aisw.onnx"
MICROSOFT_DOMAIN = "com.microsoft"


@script(Opset(CUSTOM_RMSNORM_DOMAIN, 1), default_opset=op)
def CustomRMSNorm(hidden_states: FLOAT, weight: FLOAT, epsilon: float):
    last = op.Constant(value_ints=[-1])
    sum_sq = op.ReduceSum(op.Mul(hidden_states, hidden_states), last, keepdims=1)
    count = op.ReduceSum(op.Pow(hidden_states, op.Constant(value_float=0.0)), last, keepdims=1)
    rms = op.Sqrt(op.Add(op.Div(sum_sq, count), op.Constant(value_float=epsilon)))
    return op.Mul(weight, op.Div(hidden_states, rms))


@script(Opset(MICROSOFT_DOMAIN, 1), default_opset=op)
def SimplifiedLayerNormalization(X: FLOAT, scale: FLOAT, epsilon: float, axis: int, stash_type: int):
    # Lowered only with axis=-1 and stash_type=1 (float32): the body does not read them.
    last = op.Constant(value_ints=[-1])
    sum_sq = op.ReduceSum(op.Mul(X, X), last, keepdims=1)
    count = op.ReduceSum(op.Pow(X, op.Constant(value_float=0.0)), last, keepdims=1)
    rms = op.Sqrt(op.Add(op.Div(sum_sq, count), op.Constant(value_float=epsilon)))
    return op.Mul(op.Div(X, rms), scale)


def custom_rms_norm() -> ir.Function:
    return function_from_script(CustomRMSNorm)


def simplified_layer_norm() -> ir.Function:
    return function_from_script(SimplifiedLayerNormalization)

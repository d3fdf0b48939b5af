"""SiLU lowered to a device's custom op, with an ONNX function body so onnxruntime still runs it.

A device compiler that has a fused ``Swish`` kernel wants ``x * Sigmoid(x)``
as one op in its own domain::

    x * Sigmoid(x)  ->  com.example.npu::Swish(x)

The body (written with onnxscript) rides along in ``model.functions``
(``Rule(functions=...)``): the rewritten model runs anywhere, and ``--verify``
and ``verify-rules`` can prove the rule. The body *is* the pattern; rules do
not rewrite function bodies unless they set ``in_functions=True``, so the
body never becomes a call of itself. The body is written at opset 17, so the
op survives a later ``opset-upgrade`` or a move down to 17.

Try it (docs/writing-passes.md)::

    qgraph export tiny-llama -o llama
    qgraph verify-rules --plugin examples/passes/silu_custom_op.py --rule silu-to-swish
    qgraph optimize llama/model.onnx -o llama-swish.onnx --plugin examples/passes/silu_custom_op.py \
        --passes silu-to-swish --verify
"""

from onnxscript import FLOAT, script
from onnxscript import opset17 as op17
from onnxscript.values import Opset

from qgraph import RewritePass, Rule, RuleSet
from qgraph.custom_ops import function_from_script

DEVICE_DOMAIN = "com.example.npu"


@script(Opset(DEVICE_DOMAIN, 1), default_opset=op17)
def Swish(x: FLOAT):
    return op17.Mul(x, op17.Sigmoid(x))


def swish_body():
    return function_from_script(Swish)


def silu(op, x):
    return op.Mul(x, op.Sigmoid(x), _commute=True)


def float32_only(x):
    # The body is typed for float32, the device kernel's type.
    return None if x.dtype is None or x.dtype.name == "FLOAT" else f"x is {x.dtype}, the op takes float32"


def to_swish(op, x):
    return op.Swish(x, _domain=DEVICE_DOMAIN)


RULES = RuleSet([Rule("silu-to-swish", silu, to_swish, float32_only, functions=(swish_body,),
                      opsets={DEVICE_DOMAIN: 1}, doc="x * Sigmoid(x) -> com.example.npu::Swish(x)")])


class SiLUToSwishPass(RewritePass):
    """Lower SiLU (x * Sigmoid(x)) to the custom op com.example.npu::Swish, with its function body."""

    name = "silu-to-swish"
    rules = RULES

"""GELU fusion: the erf and tanh spellings of GELU become one ``Gelu`` (opset 20).

What the rules recognize (docs/design.md, "canonicalize"), with every product
and sum matched in either operand order and the 0.5 applied at any of the
three places exporters put it::

    erf:   0.5 * x * (1 + Erf(x / sqrt(2)  |  x * (1 / sqrt(2))))         -> Gelu(x)
    tanh:  0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))        -> Gelu(x, approximate="tanh")
           x^3 = Pow(x, 3) | x * (x * x)

BERT's ``gelu`` is the erf form; GPT-2's and Phi's ``gelu_new`` the tanh
form. Constants match to float32 rounding (relative 1e-6). onnxruntime runs
``Gelu`` natively; the pass is not in a preset yet, so the ``ort`` output is
unchanged unless it is asked for (``--passes gelu`` or a pipeline).
"""

from __future__ import annotations

import math

import onnx_ir as ir
from qgraph_passes.opset_upgrade import opset_at_least

from qgraph import RewritePass, Rule, RuleSet

__all__ = ["GeluFusionPass", "RULES"]

_SQRT2 = math.sqrt(2.0)
_TANH_SCALE = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def _half_x_times(op, x, factor):
    """0.5 * x * factor, in the three groupings exporters write."""
    return (op.Mul(op.Mul(x, 0.5, _commute=True), factor, _commute=True)
            | op.Mul(x, op.Mul(0.5, factor, _commute=True), _commute=True)
            | op.Mul(op.Mul(x, factor, _commute=True), 0.5, _commute=True))


def gelu_erf(op, x):
    scaled = op.Div(x, _SQRT2) | op.Mul(x, 1.0 / _SQRT2, _commute=True)
    return _half_x_times(op, x, op.Add(op.Erf(scaled), 1.0, _commute=True))


def gelu_tanh(op, x):
    cube = op.Pow(x, 3.0) | op.Mul(x, op.Mul(x, x), _commute=True)
    inner = op.Add(x, op.Mul(cube, _CUBIC, _commute=True), _commute=True)
    return _half_x_times(op, x, op.Add(op.Tanh(op.Mul(inner, _TANH_SCALE, _commute=True)), 1.0, _commute=True))


def to_gelu(op, x):
    return op.Gelu(x, approximate="none")


def to_gelu_tanh(op, x):
    return op.Gelu(x, approximate="tanh")


def floating_x(x) -> str | None:
    if x.dtype is None:
        return f"dtype of '{x.name}' is unknown (run shape-inference)"
    if not x.dtype.is_floating_point():
        return f"'{x.name}' is {x.dtype}, not a floating-point tensor"
    return None


_EXAMPLE = {"x": (ir.DataType.FLOAT, ("B", "S", "H"))}

RULES = RuleSet(
    [
        Rule("gelu-erf", gelu_erf, to_gelu, floating_x, opsets={"": 20},
             doc="0.5 * x * (1 + erf(x / sqrt 2)) -> Gelu(x)", example_inputs=_EXAMPLE),
        Rule("gelu-tanh", gelu_tanh, to_gelu_tanh, floating_x, opsets={"": 20},
             doc="0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) -> Gelu(x, approximate='tanh')",
             example_inputs=_EXAMPLE),
    ],
    name="gelu",
)


class GeluFusionPass(RewritePass):
    """Fuse GELU (erf form, and the tanh approximation) into Gelu (opset 20).

    The rule table is ``RULES``; the module docstring shows the spellings.
    ``Gelu`` is an opset-20 op, so the manager runs ``opset-upgrade`` first
    on an export below 20.
    """

    name = "gelu"
    rules = RULES
    prerequisites = (opset_at_least(20),)

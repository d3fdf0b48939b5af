"""GELU fusion: the tanh approximation an exporter spells out -> one ``Gelu(approximate="tanh")``.

torch exports ``gelu(x, approximate="tanh")`` (Gemma's MLP) as its formula::

    x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))))

ONNX has had the op since opset 20, so the pass asks for that opset (the
manager runs ``opset-upgrade`` first when the model is older). The
replacement must be the *tanh* approximation: exact-erf ``Gelu`` differs by
up to 4.7e-4, which ``qgraph verify-rules`` catches.

Try it (docs/writing-passes.md)::

    qgraph export tiny-gemma -o gemma
    qgraph verify-rules --plugin examples/passes/gelu_fusion.py --rule gelu-tanh
    qgraph optimize gemma/model.onnx -o gemma-gelu.onnx --plugin examples/passes/gelu_fusion.py \
        --passes gelu-fusion --verify
"""

import math

from qgraph import Prerequisite, RewritePass, Rule, RuleSet
from qgraph.pass_base import default_opset


def gelu_tanh(op, x):
    cube = op.Pow(x, 3.0) | op.Mul(op.Mul(x, x), x)  # torch writes Pow; hand-written models often x*x*x
    cubic = op.Add(x, op.Mul(op.const(0.044715, rtol=1e-4), cube))
    one_plus_tanh = op.Add(op.Tanh(op.Mul(op.const(math.sqrt(2 / math.pi), rtol=1e-4), cubic)), 1.0)
    # dynamo: x * (0.5 * (1 + t)); other spellings scale x first: (0.5 * x) * (1 + t)
    return op.Mul(x, op.Mul(0.5, one_plus_tanh)) | op.Mul(op.Mul(0.5, x), one_plus_tanh)


def to_gelu(op, x):
    return op.Gelu(x, approximate="tanh")


RULES = RuleSet([Rule("gelu-tanh", gelu_tanh, to_gelu, commute=True, doc="x/2 (1 + tanh(...)) -> Gelu(x, tanh)")])


class GeluFusionPass(RewritePass):
    """Fuse the spelled-out tanh-approximated GELU into Gelu(approximate="tanh") (opset 20)."""

    name = "gelu-fusion"
    rules = RULES
    prerequisites = (
        Prerequisite("default-domain opset >= 20", lambda model: (default_opset(model) or 0) >= 20,
                     satisfied_by="opset-upgrade", options={"target": 20}),
    )

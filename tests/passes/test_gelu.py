"""gelu: every spelling of GELU (erf form, tanh approximation) fuses to one Gelu with the same outputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from qgraph_passes.gelu import RULES, GeluFusionPass

import qgraph
from qgraph import io as qio
from qgraph.verify import check_equivalent
from qgraph.verify.rule_check import check_rule

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def gelu_graphs(draw) -> tuple[onnx.ModelProto, str]:
    """y = GELU(x) written the way one of the exporters might: grouping, operand order and spelling drawn."""
    form = draw(st.sampled_from(["erf", "tanh"]))
    nodes, inits = [], []

    def const(name: str, value: float) -> str:
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
        return name

    def mul(a: str, b: str, out: str) -> str:
        nodes.append(helper.make_node("Mul", [a, b] if draw(st.booleans()) else [b, a], [out]))
        return out

    def add(a: str, b: str, out: str) -> str:
        nodes.append(helper.make_node("Add", [a, b] if draw(st.booleans()) else [b, a], [out]))
        return out

    if form == "erf":
        if draw(st.booleans()):
            nodes.append(helper.make_node("Div", ["x", const("sqrt2", math.sqrt(2.0))], ["scaled"]))
        else:
            mul("x", const("inv_sqrt2", 1 / math.sqrt(2.0)), "scaled")
        nodes.append(helper.make_node("Erf", ["scaled"], ["curve"]))
    else:
        if draw(st.booleans()):
            nodes.append(helper.make_node("Pow", ["x", const("three", 3.0)], ["cube"]))
        else:
            mul("x", mul("x", "x", "square"), "cube")
        inner = add("x", mul("cube", const("c", 0.044715), "cubic"), "inner")
        nodes.append(helper.make_node("Tanh", [mul(inner, const("k", math.sqrt(2 / math.pi)), "arg")], ["curve"]))
    one_plus = add("curve", const("one", 1.0), "one_plus")
    half = const("half", 0.5)
    grouping = draw(st.sampled_from(["(0.5x)f", "x(0.5f)", "(xf)0.5"]))
    if grouping == "(0.5x)f":
        mul(mul("x", half, "half_x"), one_plus, "y")
    elif grouping == "x(0.5f)":
        mul("x", mul(half, one_plus, "half_f"), "y")
    else:
        mul(mul("x", one_plus, "x_f"), half, "y")
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return onnx.shape_inference.infer_shapes(model), form


@SETTINGS
@given(gelu_graphs())
def test_every_spelling_fuses_to_one_gelu_with_the_same_outputs(case):
    proto, form = case
    fused = GeluFusionPass()(ir.from_proto(proto)).model
    ops = [n.op_type for n in fused.graph]
    assert ops == ["Gelu"]
    assert fused.graph.node(0).attributes.get_string("approximate") == ("none" if form == "erf" else "tanh")
    # Inputs across GELU's range (its tails, the bend around 0) plus random ones.
    x = np.concatenate([np.linspace(-8, 8, 30, dtype=np.float32),
                        np.random.default_rng(0).standard_normal(30).astype(np.float32) * 3]).reshape(10, 6)
    np.testing.assert_allclose(run(fused, {"x": x})["y"], run(proto, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_a_wrong_constant_or_a_shared_intermediate_is_not_fused():
    text = """
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[B, 6] x) => (float[B, 6] y, float[B, 6] inner) {
        three = Constant <value_float = 3.0> ()
        c = Constant <value_float = 0.04> ()
        k = Constant <value_float = 0.7978845834732056> ()
        one = Constant <value_float = 1.0> ()
        half = Constant <value_float = 0.5> ()
        cube = Pow(x, three)
        cubic = Mul(cube, c)
        inner = Add(x, cubic)
        arg = Mul(inner, k)
        curve = Tanh(arg)
        one_plus = Add(curve, one)
        half_x = Mul(x, half)
        y = Mul(half_x, one_plus)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    p = GeluFusionPass()
    assert not p(model).modified  # 0.04 is not GELU's 0.044715
    fixed = text.replace("value_float = 0.04>", "value_float = 0.044715>")
    model = ir.from_proto(onnx.parser.parse_model(fixed))
    assert not GeluFusionPass()(model).modified  # 'inner' is also a graph output
    unshared = fixed.replace(", float[B, 6] inner)", ")")
    model = ir.from_proto(onnx.parser.parse_model(unshared))
    assert GeluFusionPass()(model).modified
    assert [n.op_type for n in model.graph if n.op_type != "Constant"] == ["Gelu"]


@pytest.mark.parametrize("rule", RULES.rules, ids=lambda r: r.name)
def test_each_rule_holds_on_its_own(rule):
    result = check_rule(rule, examples=2)
    assert result.ok, str(result)


GELUS = {"bert": "gelu-erf", "gpt2": "gelu-tanh", "phi": "gelu-tanh"}


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", list(GELUS))
def test_every_gelu_of_the_zoo_fuses_and_the_outputs_stay(tiny_zoo, arch, exporter):
    from qgraph.export.zoo import LAYERS

    source = tiny_zoo.export(arch, exporter).model_path
    fused, report = qgraph.optimize_with_report(qio.load(source), ["gelu"])
    record = report.passes[-1]
    assert record.rule_matches == {GELUS[arch]: LAYERS}  # one activation per layer
    assert record.op_histogram.get("Gelu") == LAYERS
    assert "Erf" not in record.op_histogram and "Tanh" not in record.op_histogram
    verdict = check_equivalent(qio.load(source), fused, examples=3, localize_divergence=False, save_artifacts=False)
    assert verdict.equivalent, str(verdict)


def test_random_inputs_agree_with_the_definition():
    """The fused op computes GELU itself (not just what the subgraph computed): erf form to 1e-6."""
    x = np.linspace(-6, 6, 25, dtype=np.float32).reshape(1, 25)
    text = """
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[1, 25] x) => (float[1, 25] y) {
        s = Constant <value_float = 1.4142135381698608> ()
        one = Constant <value_float = 1.0> ()
        half = Constant <value_float = 0.5> ()
        d = Div(x, s)
        e = Erf(d)
        f = Add(e, one)
        h = Mul(half, f)
        y = Mul(x, h)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    assert GeluFusionPass()(model).modified
    got = run(model, {"x": x})["y"]
    expected = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x[0].astype(np.float64)])
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)

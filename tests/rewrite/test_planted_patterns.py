"""Property: in random graphs, the engine rewrites exactly the planted instances.

Hypothesis builds a random graph from a small elementwise vocabulary and
plants, at random places, true instances of an expanded softmax and decoys
that look like one but are not (reduction over another axis, an
intermediate used elsewhere, a different op in the middle). The fusion must
rewrite every true instance, leave every decoy, and the rewritten model must
compute the same outputs in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphs import FLOAT, GraphBuilder, const, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qgraph.rewrite import Rule, RuleSet, apply_rules


def softmax_pattern(op, x):
    e = op.Exp(op.Sub(x, op.ReduceMax(x, op.const([-1]), keepdims=1)))
    return op.Div(e, op.ReduceSum(e, op.const([-1]), keepdims=1))


SOFTMAX = RuleSet([Rule("softmax", softmax_pattern, lambda op, x: op.Softmax(x, axis=-1))])

UNARY = ["Relu", "Tanh", "Neg", "Sigmoid"]
BINARY = ["Add", "Mul"]
KINDS = ["op", "softmax", "decoy_axis", "decoy_shared", "decoy_middle"]


@st.composite
def graph_recipes(draw):
    steps = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=12))
    recipe = []
    for i, kind in enumerate(steps):
        a = draw(st.integers(0, i))  # any earlier value (0 = the input)
        b = draw(st.integers(0, i))
        op = draw(st.sampled_from(UNARY + BINARY))
        recipe.append((kind, a, b, op))
    return recipe


def build(recipe):
    x = ir.val("x", FLOAT, ir.Shape((2, 5)))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="g")
    op = GraphBuilder(graph)
    last = const(op, [-1], "last_axis")
    first = const(op, [0], "first_axis")
    values = [x]
    extra_outputs = []
    for kind, a, b, name in recipe:
        va, vb = values[a], values[b]
        if kind == "op":
            out = getattr(op, name)(va, vb) if name in BINARY else getattr(op, name)(va)
        else:
            axis = first if kind == "decoy_axis" else last
            shifted = op.Sub(va, op.ReduceMax(va, last, keepdims=1))
            e = op.Tanh(shifted) if kind == "decoy_middle" else op.Exp(shifted)
            out = op.Div(e, op.ReduceSum(e, axis, keepdims=1))
            if kind == "decoy_shared":
                extra_outputs.append(op.Neg(e))
        values.append(out)
    graph.outputs.extend([values[-1], *extra_outputs])
    for i, v in enumerate(graph.outputs):
        v.name = f"out{i}"
    model = ir.Model(graph, ir_version=10)
    return model


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recipe=graph_recipes(),
    data=hnp.arrays(np.float32, (2, 5), elements=st.floats(-4, 4, width=32)),
)
def test_engine_rewrites_exactly_the_planted_instances(recipe, data):
    model = build(recipe)
    reference = model.clone()
    planted = sum(kind == "softmax" for kind, *_ in recipe)
    decoys = sum(kind.startswith("decoy") for kind, *_ in recipe)

    stats = apply_rules(model, SOFTMAX)

    assert stats.matches.get("softmax", 0) == planted
    kinds = [n.op_type for n in model.graph]
    assert kinds.count("Softmax") == planted
    assert kinds.count("ReduceSum") == decoys  # every decoy left intact
    expected = run(reference, {"x": data})
    actual = run(model, {"x": data})
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)

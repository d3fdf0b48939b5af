"""replace_node: the public splice a node-by-node pass (lower-attention) uses instead of engine internals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from graphs import FLOAT, make_model, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph.errors import RewriteError
from qgraph.invariants import find_violations
from qgraph.rewrite import replace_node
from qgraph.rewrite.node_replacement import PASS_KEY, RULE_KEY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))


def softmax_model():
    return make_model(lambda op, x: op.Neg(op.Softmax(x, axis=-1)), {"x": (FLOAT, ("B", 5))})


def primitive_softmax(op, x):
    shifted = op.Sub(x, op.ReduceMax(x, op.const(np.array([-1], np.int64)), keepdims=1))
    exp = op.Exp(shifted)
    return [op.Div(exp, op.ReduceSum(exp, op.const(np.array([-1], np.int64)), keepdims=1))]


def test_a_node_is_replaced_typed_stamped_and_equivalent():
    model = softmax_model()
    reference = model.clone()
    (softmax,) = [n for n in model.graph if n.op_type == "Softmax"]
    softmax.metadata_props["qgraph.layer"] = "3"
    old_name = softmax.outputs[0].name
    created = replace_node(model, softmax, lambda op: primitive_softmax(op, softmax.inputs[0]),
                           rule_name="softmax-to-primitive", pass_name="lower-softmax")
    assert "Softmax" not in [n.op_type for n in model.graph]
    assert all(n.metadata_props[RULE_KEY] == "softmax-to-primitive" for n in created)
    assert all(n.metadata_props[PASS_KEY] == "lower-softmax" for n in created)
    assert all(n.metadata_props["qgraph.layer"] == "3" for n in created)
    assert created[-1].outputs[0].name == old_name and created[-1].outputs[0].dtype == FLOAT
    assert find_violations(model) == []
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(reference, feeds)[0], run(model, feeds)[0], rtol=1e-6, atol=1e-6)


def test_an_existing_value_for_a_graph_output_keeps_the_name_through_an_identity():
    model = make_model(lambda op, x: op.Relu(op.Relu(x)), {"x": (FLOAT, ("B", 5))})
    outer = list(model.graph)[-1]
    name = outer.outputs[0].name
    replace_node(model, outer, lambda op: [outer.inputs[0]], rule_name="relu-relu")
    assert [n.op_type for n in model.graph] == ["Relu", "Identity"]
    assert [o.name for o in model.graph.outputs] == [name] and find_violations(model) == []


@pytest.mark.parametrize(("build", "message"), [
    (lambda op, x: [op.Cast(x, to=int(ir.DataType.INT64))], "dtype"),
    (lambda op, x: [op.Sofmtax(x)], "Sofmtax"),
    (lambda op, x: [], "0 value"),
    (lambda op, x: [None], "no value"),
])
def test_a_bad_replacement_is_an_error_naming_the_rule_and_leaves_the_graph_alone(build, message):
    model = softmax_model()
    (softmax,) = [n for n in model.graph if n.op_type == "Softmax"]
    before = [n.op_type for n in model.graph]
    with pytest.raises(RewriteError, match=rf"rule 'bad'.*{message}"):
        replace_node(model, softmax, lambda op: build(op, softmax.inputs[0]), rule_name="bad")
    assert [n.op_type for n in model.graph] == before


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_lower_attention_needs_nothing_but_replace_node(data):
    """lower-attention's own builder, spliced with replace_node, gives what the pass gives."""
    from attention_graphs import build, cores, feeds
    from builders import run as run_proto
    from qgraph_passes.attention import AttentionFusionPass
    from qgraph_passes.attention_lowering import LowerAttentionPass, lower_primitive

    core = data.draw(cores(broken=False))
    fused = ir.from_proto(build(core))
    AttentionFusionPass()(fused)
    by_pass, by_api = fused.clone(), fused.clone()
    LowerAttentionPass(to="primitive")(by_pass)
    for node in [n for n in by_api.graph if n.op_type == "Attention"]:
        replace_node(by_api, node, lambda op, node=node: lower_primitive(op, node),
                     rule_name="attention-to-primitive", pass_name="lower-attention", name_prefix=f"lower-attention/{node.name}")
    assert sorted(n.op_type for n in by_api.graph) == sorted(n.op_type for n in by_pass.graph)
    assert find_violations(by_api) == []
    feed = data.draw(feeds(core))
    expected = run_proto(ir.to_proto(by_pass), feed)["Y"]
    actual = run_proto(ir.to_proto(by_api), feed)["Y"]
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6, equal_nan=True)

"""Rules rewrite the main graph and its subgraphs; function bodies only when a rule asks.

The trap: a rule lowering a pattern to a custom op whose function body *is*
that pattern rewrote the body too, leaving a function that calls itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import FLOAT, run

from qgraph.invariants import InvariantChecker, find_violations
from qgraph.rewrite import Rule, RuleSet, apply_rules, explain, find_matches

DOMAIN = "com.example"


def neg_relu(op, x):
    return op.Neg(op.Relu(x))


def _function(name: str, body_op: str = "pattern") -> ir.Function:
    fx = ir.val("fx", FLOAT, ir.Shape((4,)))
    if body_op == "pattern":
        relu = ir.node("Relu", [fx])
        nodes = [relu, ir.node("Neg", [relu.outputs[0]])]
    else:  # a call of another function of the domain
        nodes = [ir.node(body_op, [fx], domain=DOMAIN)]
    graph = ir.Graph([fx], [nodes[-1].outputs[0]], nodes=nodes, opset_imports={"": 23, DOMAIN: 1})
    return ir.Function(DOMAIN, name, "", graph=graph, attributes=[])


def negrelu_function() -> ir.Function:
    return _function("NegRelu")


TO_CUSTOM_OP = Rule("neg-relu-to-custom-op", neg_relu, lambda op, x: op.NegRelu(x, _domain=DOMAIN),
                    functions=(negrelu_function,), opsets={DOMAIN: 1})


def model_with_pattern_and_function() -> ir.Model:
    """Main graph: Neg(Relu(x)) -> y, plus a call of NegRelu (whose body is the same pattern)."""
    x = ir.val("x", FLOAT, ir.Shape((4,)))
    relu = ir.node("Relu", [x])
    neg = ir.node("Neg", [relu.outputs[0]])
    call = ir.node("NegRelu", [x], domain=DOMAIN)
    add = ir.node("Add", [neg.outputs[0], call.outputs[0]])
    add.outputs[0].name, add.outputs[0].dtype, add.outputs[0].shape = "y", FLOAT, ir.Shape((4,))
    graph = ir.Graph([x], [add.outputs[0]], nodes=[relu, neg, call, add], opset_imports={"": 23, DOMAIN: 1}, name="g")
    return ir.Model(graph, ir_version=10, functions=[negrelu_function()])


def body_ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.functions[(DOMAIN, "NegRelu", "")]]


def test_a_rule_leaves_function_bodies_alone_by_default():
    model = model_with_pattern_and_function()
    reference = model.clone()
    assert apply_rules(model, RuleSet([TO_CUSTOM_OP])).matches == {"neg-relu-to-custom-op": 1}
    assert body_ops(model) == ["Relu", "Neg"]
    assert [n.op_type for n in model.graph] == ["NegRelu", "NegRelu", "Add"]
    assert find_violations(model) == []
    feeds = {"x": np.array([-2, -1, 0, 3], np.float32)}
    np.testing.assert_array_equal(run(reference, feeds)[0], run(model, feeds)[0])


def test_match_only_and_explain_skip_function_bodies_by_default():
    model = model_with_pattern_and_function()
    assert len(find_matches(model, RuleSet([TO_CUSTOM_OP]))) == 1
    assert all(not c.graph for c in explain(model, TO_CUSTOM_OP))


def test_a_rule_that_asks_rewrites_function_bodies():
    inside = Rule("neg-relu-in-functions", neg_relu, lambda op, x: op.Neg(op.Max(x, op.const(np.float32(0)))),
                  in_functions=True)
    model = model_with_pattern_and_function()
    assert apply_rules(model, RuleSet([inside])).total == 2
    assert body_ops(model) == ["Constant", "Max", "Neg"]


def test_invariants_reject_a_function_that_calls_itself():
    model = model_with_pattern_and_function()
    model.functions[(DOMAIN, "NegRelu", "")] = _function("NegRelu", body_op="NegRelu")
    problems = find_violations(model)
    assert any("NegRelu" in p and "calls itself" in p for p in problems), problems
    checker = InvariantChecker()
    assert any("calls itself" in p for p in checker(model))


def test_invariants_reject_functions_that_call_each_other_in_a_cycle():
    model = model_with_pattern_and_function()
    model.functions[(DOMAIN, "NegRelu", "")] = _function("NegRelu", body_op="Helper")
    helper = _function("Helper", body_op="NegRelu")
    model.functions[helper.identifier()] = helper
    problems = find_violations(model)
    assert any("NegRelu -> " in p and "calls itself" in p for p in problems), problems


@pytest.mark.parametrize("calls", ["pattern", "Other"])
def test_functions_calling_other_functions_without_a_cycle_are_fine(calls):
    model = model_with_pattern_and_function()
    other = _function("Other")
    model.functions[other.identifier()] = other
    model.functions[(DOMAIN, "NegRelu", "")] = _function("NegRelu", body_op=calls)
    assert not any("calls itself" in p for p in find_violations(model))

"""One test (or a positive/negative pair) per feature of the rewrite engine."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import FLOAT, const, make_model, ops, run

from qgraph.errors import RewriteError
from qgraph.rewrite import Rule, RuleSet, apply_rules, explain, find_matches

X = {"x": (FLOAT, ("B", "S", 8))}


def rms_graph(op, x, *, scale_first=True, eps=1e-6, axis=-1, outside_use=False):
    sq = op.Mul(x, x)
    mean = op.ReduceMean(sq, const(op, [axis], "axes"), keepdims=1)
    denom = op.Sqrt(op.Add(mean, const(op, np.float32(eps), "eps")))
    normed = op.Div(x, denom)
    w = const(op, np.linspace(0.5, 1.5, 8, dtype=np.float32), "w")
    y = op.Mul(w, normed) if scale_first else op.Mul(normed, w)
    return (y, op.Neg(sq)) if outside_use else y


def rms_pattern(op, x, w):
    mean = op.ReduceMean(op.Mul(x, x), op.const([-1]), keepdims=1)
    return op.Mul(w, op.Div(x, op.Sqrt(op.Add(mean, op.const(name="eps")))), _commute=True)


def rms_condition(match, eps):
    if eps.size != 1:
        return f"epsilon has {eps.size} elements, not 1"
    match["epsilon"] = float(eps.reshape(-1)[0])
    return None


def rms_replacement(op, x, w, epsilon):
    return op.RMSNormalization(x, w, epsilon=epsilon, axis=-1)


RMS = RuleSet([Rule("rms", rms_pattern, rms_replacement, rms_condition)])


def feeds(shape=(2, 3, 8), seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def assert_equivalent(before: ir.Model, after: ir.Model, shape=(2, 3, 8)):
    f = feeds(shape)
    for a, b in zip(run(before, f), run(after, f)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_first", [True, False])
def test_commutative_input_declared_once_matches_both_orders(scale_first):
    model = make_model(lambda op, x: rms_graph(op, x, scale_first=scale_first), X)
    reference = model.clone()
    stats = apply_rules(model, RMS)
    assert stats.matches == {"rms": 1}
    assert ops(model) == ["RMSNormalization"]
    assert_equivalent(reference, model)
    assert len(RMS.rules) == 1  # no cloned rule per input order


def test_without_commute_only_the_written_order_matches():
    def strict(op, x, w):
        mean = op.ReduceMean(op.Mul(x, x), op.const([-1]), keepdims=1)
        return op.Mul(w, op.Div(x, op.Sqrt(op.Add(mean, op.const(name="eps")))))

    rules = RuleSet([Rule("strict", strict, rms_replacement, rms_condition)])
    swapped = make_model(lambda op, x: rms_graph(op, x, scale_first=False), X)
    assert apply_rules(swapped, rules).total == 0
    written = make_model(lambda op, x: rms_graph(op, x, scale_first=True), X)
    assert apply_rules(written, rules).total == 1


def test_condition_result_reaches_replacement_through_match():
    model = make_model(lambda op, x: rms_graph(op, x, eps=1e-5), X)
    apply_rules(model, RMS)
    (node,) = list(model.graph)
    assert node.attributes["epsilon"].value == pytest.approx(1e-5)


def test_condition_reason_blocks_rewrite_and_is_reported():
    def vector_eps(op, x):
        mean = op.ReduceMean(op.Mul(x, x), const(op, [-1], "axes"), keepdims=1)
        denom = op.Sqrt(op.Add(mean, const(op, np.full(8, 1e-6, np.float32), "eps")))
        return op.Mul(const(op, np.ones(8, np.float32), "w"), op.Div(x, denom))

    model = make_model(vector_eps, X)
    assert apply_rules(model, RMS).total == 0
    reasons = [c.reason for c in explain(model, RMS) if c.nodes_matched == c.nodes_total]
    assert reasons == ["epsilon has 8 elements, not 1"]


def test_outside_use_of_intermediate_blocks_rewrite():
    model = make_model(lambda op, x: rms_graph(op, x, outside_use=True), X)
    assert apply_rules(model, RMS).total == 0
    assert "RMSNormalization" not in ops(model)
    (full,) = [c for c in explain(model, RMS) if c.nodes_matched == c.nodes_total]
    assert "used by Neg" in full.reason


def test_keep_shared_allows_outside_use_and_keeps_the_shared_node():
    rule = Rule("rms-shared", rms_pattern, rms_replacement, rms_condition, keep_shared=True)
    model = make_model(lambda op, x: rms_graph(op, x, outside_use=True), X)
    reference = model.clone()
    assert apply_rules(model, RuleSet([rule])).total == 1
    assert sorted(ops(model)) == ["Mul", "Neg", "RMSNormalization"]  # x*x stays for Neg
    assert_equivalent(reference, model)


def test_attribute_exact_match_and_mismatch():
    def softmax_pattern(op, x):
        return op.Softmax(x, axis=-1)

    rules = RuleSet([Rule("sm", softmax_pattern, lambda op, x: op.Softmax(x, axis=2))])
    last = make_model(lambda op, x: op.Softmax(x, axis=-1), X)
    first = make_model(lambda op, x: op.Softmax(x, axis=0), X)
    assert len(find_matches(last, rules)) == 1
    assert find_matches(first, rules) == []
    (cand,) = explain(first, rules)
    assert "axis=0" in cand.reason


def test_omitted_attribute_uses_schema_default():
    rules = RuleSet([Rule("sm", lambda op, x: op.Softmax(x, axis=-1), lambda op, x: op.Softmax(x, axis=2))])
    omitted = make_model(lambda op, x: op.Softmax(x), X)  # opset 13+: default axis -1
    assert len(find_matches(omitted, rules)) == 1


def test_attribute_capture_and_predicate():
    def pattern(op, x):
        return op.Softmax(x, axis=op.attr(lambda a: a in (-1, 2), name="axis"))

    def condition(match, axis):
        match["seen"] = axis

    rules = RuleSet([Rule("sm", pattern, lambda op, x, seen: op.Softmax(x, axis=seen), condition)])
    model = make_model(lambda op, x: op.Softmax(x, axis=2), X)
    (m,) = find_matches(model, rules)
    assert m["axis"] == 2
    assert find_matches(make_model(lambda op, x: op.Softmax(x, axis=1), X), rules) == []


def test_domain_is_part_of_the_op():
    def pattern(op, x):
        return op.Gelu(x, _domain="com.microsoft")

    rules = RuleSet([Rule("ms-gelu", pattern, lambda op, x: op.Gelu(x))])
    ms = make_model(lambda op, x: op.Gelu(x, _domain="com.microsoft"), X, extra_opsets={"com.microsoft": 1})
    std = make_model(lambda op, x: op.Gelu(x), X)
    assert len(find_matches(ms, rules)) == 1
    assert find_matches(std, rules) == []
    assert ("com.microsoft", "Gelu") in rules.dispatch and ("", "Gelu") not in rules.dispatch


def test_alternatives_inside_and_at_the_root_are_indexed_under_each_root_op():
    def pattern(op, x, y):
        root = op.Sqrt(y) | op.Pow(y, 0.5)
        return op.Div(x, root) | op.Mul(x, op.Reciprocal(root))

    rules = RuleSet([Rule("div-sqrt", pattern, lambda op, x, y: op.Div(x, op.Sqrt(y)))])
    assert set(rules.dispatch) == {("", "Div"), ("", "Mul")}
    inputs = {"x": (FLOAT, (4,)), "y": (FLOAT, (4,))}
    variants = [
        lambda op, x, y: op.Div(x, op.Sqrt(y)),
        lambda op, x, y: op.Div(x, op.Pow(y, const(op, np.float32(0.5), "h"))),
        lambda op, x, y: op.Mul(x, op.Reciprocal(op.Pow(y, const(op, np.float32(0.5), "h")))),
    ]
    for build in variants:
        assert len(find_matches(make_model(build, inputs), rules)) == 1
    wrong_power = lambda op, x, y: op.Div(x, op.Pow(y, const(op, np.float32(2.0), "h")))  # noqa: E731
    assert find_matches(make_model(wrong_power, inputs), rules) == []


def test_named_alternative_records_which_branch_matched():
    def pattern(op, x):
        return op.Neg(op.any_of(op.Relu(x), op.Sigmoid(x), name="act"))

    rules = RuleSet([Rule("neg-act", pattern, lambda op, x: op.Neg(op.Relu(x)))])
    (m,) = find_matches(make_model(lambda op, x: op.Neg(op.Sigmoid(x)), X), rules)
    assert m["act"] == 1


def test_optional_cast():
    def pattern(op, x):
        return op.Sqrt(op.optional(op.Cast(x, to=1)))

    rules = RuleSet([Rule("sqrt", pattern, lambda op, x: op.Sqrt(op.Cast(x, to=1)))])
    with_cast = make_model(lambda op, x: op.Sqrt(op.Cast(x, to=1)), {"x": (ir.DataType.FLOAT16, (4,))})
    without = make_model(lambda op, x: op.Sqrt(x), {"x": (FLOAT, (4,))})
    other_cast = make_model(lambda op, x: op.Sqrt(op.Cast(x, to=10)), {"x": (FLOAT, (4,))})
    (m1,) = find_matches(with_cast, rules)
    (m2,) = find_matches(without, rules)
    assert len(m1.nodes) == 2 and len(m2.nodes) == 1
    # Cast to fp16 is not the optional Cast; falling back to "no Cast" binds x
    # to the Cast's output, which is a legitimate (smaller) match.
    (m3,) = find_matches(other_cast, rules)
    assert len(m3.nodes) == 1 and m3["x"].producer().op_type == "Cast"


def _shared_optional_cast(op, x):
    # One named optional Cast reached along two paths: directly and through the Sqrt.
    xc = op.optional(op.Cast(x, to=1), name="upcast")
    return op.Mul(xc, op.Sqrt(xc))


SHARED_CAST = RuleSet([Rule("shared-cast", _shared_optional_cast, lambda op, x: op.Identity(x))])


@pytest.mark.parametrize(("build", "dtype", "branch"), [
    (lambda op, x: (c := op.Cast(x, to=1), op.Mul(c, op.Sqrt(c)))[1], ir.DataType.FLOAT16, 0),
    (lambda op, x: op.Mul(x, op.Sqrt(x)), FLOAT, 1),
])
def test_named_alternative_reached_twice_matches_once_per_branch(build, dtype, branch):
    model = make_model(build, {"x": (dtype, (4,))})
    (m,) = find_matches(model, SHARED_CAST)
    assert m["upcast"] == branch
    assert len(m.nodes) == (3 if branch == 0 else 2)
    # A rejecting condition makes the matcher backtrack through both visits.
    rejecting = RuleSet([Rule("shared-cast", _shared_optional_cast, lambda op, x: op.Identity(x),
                              condition=lambda upcast: f"rejected branch {upcast}")])
    assert find_matches(model, rejecting) == []
    (cand,) = explain(model, rejecting)
    assert "rejected branch" in cand.reason


def test_named_alternative_reached_twice_takes_the_same_branch_both_times():
    # Direct path without the Cast, Sqrt path with it: the pattern says one
    # Cast on both paths, so this is not a match (neither branch fits both).
    model = make_model(lambda op, x: op.Mul(x, op.Sqrt(op.Cast(x, to=1))), X)
    assert find_matches(model, SHARED_CAST) == []


def test_attribute_captured_by_two_nodes_must_agree():
    def pattern(op, x, y):
        return op.Concat(op.Shape(op.Cast(x, to=op.capture("t"))), op.Shape(op.Cast(y, to=op.capture("t"))), axis=0)

    rules = RuleSet([Rule("same-cast", pattern, lambda op, x, y: op.Concat(op.Shape(x), op.Shape(y), axis=0),
                          condition=lambda t: f"rejected t={t}")])
    inputs = {"x": (FLOAT, (4,)), "y": (FLOAT, (4,))}

    def shapes_of_casts(to_x, to_y):
        return lambda op, x, y: op.Concat(op.Shape(op.Cast(x, to=to_x)), op.Shape(op.Cast(y, to=to_y)), axis=0)

    same = make_model(shapes_of_casts(10, 10), inputs)
    mixed = make_model(shapes_of_casts(10, 1), inputs)
    assert "rejected t=10" in explain(same, rules)[0].reason  # bound once, undone cleanly
    assert "'t' is 10 elsewhere" in explain(mixed, rules)[0].reason


def test_constant_by_value_with_tolerance():
    def pattern(op, x):
        return op.Add(x, op.const(1e-6, rtol=1e-3))

    rules = RuleSet([Rule("add-eps", pattern, lambda op, x: op.Add(x, op.const(np.float32(1e-6))))])
    close = make_model(lambda op, x: op.Add(x, const(op, np.float32(1.0000001e-6), "e")), X)
    far = make_model(lambda op, x: op.Add(x, const(op, np.float32(1e-5), "e")), X)
    assert len(find_matches(close, rules)) == 1
    assert find_matches(far, rules) == []
    assert "not [1e-06]" in explain(far, rules)[0].reason or "not 1e-06" in explain(far, rules)[0].reason


def test_constant_by_predicate_and_non_constant_rejected():
    def pattern(op, x, y):
        return op.Add(x, op.const(pred=lambda a: a.size == 1 and float(a.reshape(-1)[0]) > 0, name="c"))

    rules = RuleSet([Rule("add-pos", pattern, lambda op, x, c: op.Add(x, op.const(c)))])
    pos = make_model(lambda op, x, y: op.Add(x, const(op, np.float32(2.0), "c")), {**X, "y": (FLOAT, (1,))})
    neg = make_model(lambda op, x, y: op.Add(x, const(op, np.float32(-2.0), "c")), {**X, "y": (FLOAT, (1,))})
    var = make_model(lambda op, x, y: op.Add(x, y), {**X, "y": (FLOAT, (1,))})
    assert len(find_matches(pos, rules)) == 1
    assert find_matches(neg, rules) == []
    assert find_matches(var, rules) == []
    assert "is a graph input" in explain(var, rules)[0].reason or "not a constant" in explain(var, rules)[0].reason


def test_dtype_and_shape_conditions_with_symbolic_dim_binding():
    def pattern(op, x, w):
        return op.Mul(x.where(dtype=FLOAT, shape=("B", "S", "H")), w.where(shape=("H",)))

    rules = RuleSet([Rule("mul", pattern, lambda op, x, w: op.Mul(w, x))])
    good = make_model(lambda op, x: op.Mul(x, const(op, np.ones(8, np.float32), "w")), X)
    bad_dim = make_model(lambda op, x: op.Mul(x, const(op, np.ones(1, np.float32), "w")), X)
    bad_dtype = make_model(
        lambda op, x: op.Mul(x, const(op, np.ones(8, np.float16), "w")), {"x": (ir.DataType.FLOAT16, ("B", "S", 8))}
    )
    (m,) = find_matches(good, rules)
    assert m["H"] == 8 and m["B"] == "B"
    assert find_matches(bad_dim, rules) == []
    assert "dim 'H' is 1 here but 8 elsewhere" in explain(bad_dim, rules)[0].reason
    assert find_matches(bad_dtype, rules) == []


def test_multi_output_pattern_rewrites_both_outputs():
    def pattern(op, x):
        s = op.Add(x, x)
        return op.Relu(s), op.Sigmoid(s)

    def replacement(op, x):
        s = op.Mul(x, 2.0)
        return op.Relu(s), op.Sigmoid(s)

    rules = RuleSet([Rule("two-out", pattern, replacement)])
    model = make_model(lambda op, x: (lambda s: (op.Relu(s), op.Sigmoid(s)))(op.Add(x, x)), X)
    reference = model.clone()
    assert apply_rules(model, rules).total == 1
    assert sorted(ops(model)) == ["Mul", "Relu", "Sigmoid"]
    assert [o.name for o in model.graph.outputs] == [o.name for o in reference.graph.outputs]
    assert_equivalent(reference, model)


def test_replacement_changing_dtype_is_rejected_naming_the_rule():
    rules = RuleSet([Rule("bad-cast", lambda op, x: op.Relu(x), lambda op, x: op.Cast(op.Relu(x), to=10))])
    model = make_model(lambda op, x: op.Relu(x), X)
    with pytest.raises(RewriteError, match="bad-cast.*dtype") as err:
        apply_rules(model, rules)
    assert err.value.rule_name == "bad-cast"
    assert ops(model) == ["Relu"]  # rejected before the graph was touched


def test_replacement_changing_rank_is_rejected():
    rules = RuleSet([
        Rule("bad-rank", lambda op, x: op.Relu(x), lambda op, x: op.ReduceSum(op.Relu(x), keepdims=0))
    ])
    with pytest.raises(RewriteError, match="bad-rank.*rank"):
        apply_rules(make_model(lambda op, x: op.Relu(x), X), rules)


def test_rule_recreating_its_own_pattern_is_stopped():
    rules = RuleSet([Rule("swap", lambda op, x, y: op.Add(x, y), lambda op, x, y: op.Add(y, x))])
    model = make_model(lambda op, x, y: op.Add(x, y), {"x": (FLOAT, (4,)), "y": (FLOAT, (4,))})
    with pytest.raises(RewriteError, match="swap.*re-creates its pattern"):
        apply_rules(model, rules)


def test_replacement_returning_existing_value_keeps_graph_output_name():
    def pattern(op, x):
        return op.Mul(x, 1.0, _commute=True)

    rules = RuleSet([Rule("mul-one", pattern, lambda op, x: x, doc="x*1 -> x")])
    model = make_model(lambda op, x: op.Mul(const(op, np.float32(1.0), "one"), x), X)
    name = model.graph.outputs[0].name
    reference = model.clone()
    assert apply_rules(model, rules).total == 1
    assert ops(model) == ["Identity"]
    assert model.graph.outputs[0].name == name
    assert "one" not in model.graph.initializers  # dead constant removed with its user
    assert_equivalent(reference, model)


def test_internal_replacement_takes_the_replaced_value_name():
    def build(op, x):
        return op.Neg(op.Mul(x, const(op, np.float32(1.0), "one")))

    model = make_model(build, X)
    inner = next(n for n in model.graph if n.op_type == "Mul").outputs[0].name
    rules = RuleSet([Rule("mul-to-id", lambda op, x: op.Mul(x, 1.0), lambda op, x: op.Identity(x))])
    apply_rules(model, rules)
    assert next(n for n in model.graph if n.op_type == "Identity").outputs[0].name == inner


def test_dispatch_only_tries_rules_at_their_root_op(monkeypatch):
    tried: list[str] = []
    import qgraph.rewrite.engine as engine

    original = engine._Matcher.try_rule

    def spy(self, rule, root):
        tried.append(root.op_type)
        return original(self, rule, root)

    monkeypatch.setattr(engine._Matcher, "try_rule", spy)
    model = make_model(lambda op, x: op.Sigmoid(op.Relu(op.Neg(op.Relu(x)))), X)
    rules = RuleSet([Rule("relu", lambda op, x: op.Relu(op.Neg(x)), lambda op, x: op.Neg(op.Neg(op.Relu(op.Neg(x)))))])
    find_matches(model, rules)
    assert tried == ["Relu", "Relu"]


def test_required_ops_are_those_in_every_alternative():
    def pattern(op, x, y):
        root = op.Sqrt(y) | op.Pow(y, 0.5)
        return op.Div(x, root) | op.Mul(x, op.Reciprocal(root))

    (rule,) = RuleSet([Rule("div-sqrt", pattern, lambda op, x, y: op.Div(x, op.Sqrt(y)))])
    assert rule.pattern_graph.required_ops() == frozenset()
    (rule,) = RMS
    assert rule.pattern_graph.required_ops() == {("", op) for op in ("Mul", "ReduceMean", "Div", "Sqrt", "Add")}


def test_no_sweep_runs_once_an_op_the_rule_needs_is_gone(monkeypatch):
    """After the RMS pattern is fused no ReduceMean is left: the sweep that would confirm it is skipped."""
    import qgraph.rewrite.engine as engine

    tried: list[str] = []
    original = engine._Matcher.try_rule
    monkeypatch.setattr(engine._Matcher, "try_rule", lambda self, rule, root: tried.append(root.op_type) or original(self, rule, root))
    model = make_model(lambda op, x: op.Relu(op.Mul(rms_graph(op, x), op.Neg(x))), X)
    stats = apply_rules(model, RMS)
    assert stats.matches == {"rms": 1} and stats.sweeps == 1
    assert ops(model) == ["RMSNormalization", "Neg", "Mul", "Relu"]
    # A graph with Mul roots but no ReduceMean is not searched at all.
    tried.clear()
    assert apply_rules(make_model(lambda op, x: op.Mul(x, x), X), RMS).sweeps == 0
    assert tried == []


def test_explain_lists_every_candidate_not_only_the_best():
    def build(op, x):
        a = op.Softmax(x, axis=0)
        b = op.Softmax(a, axis=1)
        return op.Softmax(b, axis=-1)

    rules = RuleSet([Rule("sm-last", lambda op, x: op.Softmax(x, axis=-1), lambda op, x: op.Softmax(x, axis=2))])
    cands = explain(make_model(build, X), rules)
    assert [c.matched for c in cands] == [False, False, True]
    assert all(c.reason and "attribute axis" in c.reason for c in cands[:2])


def test_find_matches_does_not_modify_the_model():
    model = make_model(lambda op, x: rms_graph(op, x), X)
    before = ops(model)
    (m,) = find_matches(model, RMS)
    assert ops(model) == before
    assert m["epsilon"] == pytest.approx(1e-6)  # the condition ran
    assert len(m.nodes) == 6


def test_rewrite_inside_a_model_function_when_the_rule_asks():
    fx = ir.val("fx", FLOAT, ir.Shape((4,)))
    relu = ir.node("Relu", [fx])
    neg = ir.node("Neg", [relu.outputs[0]])
    function = ir.Function("local", "f", "", graph=ir.Graph([fx], [neg.outputs[0]], nodes=[relu, neg], opset_imports={"": 23}), attributes=[])
    x = ir.val("x", FLOAT, ir.Shape((4,)))
    call = ir.node("f", [x], domain="local")
    call.outputs[0].name = "y"
    call.outputs[0].dtype = FLOAT
    graph = ir.Graph([x], [call.outputs[0]], nodes=[call], opset_imports={"": 23, "local": 1})
    model = ir.Model(graph, ir_version=10, functions=[function])
    rules = RuleSet([Rule("neg-relu", lambda op, x: op.Neg(op.Relu(x)), lambda op, x: op.Neg(op.Max(x, op.const(np.float32(0)))), in_functions=True)])
    reference = model.clone()
    assert apply_rules(model, rules).total == 1
    assert [n.op_type for n in function] == ["Constant", "Max", "Neg"]
    f = {"x": np.array([-1, 0, 1, 2], np.float32)}
    np.testing.assert_array_equal(run(reference, f)[0], run(model, f)[0])

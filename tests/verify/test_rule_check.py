"""Rule self-check: every variant of a rule's pattern is built, matched and compared."""

from __future__ import annotations

import dataclasses
import io
import itertools

import numpy as np
import onnx_ir as ir
import pytest
from framework_passes import registry_with_test_passes
from hypothesis import given, settings
from hypothesis import strategies as st
from qgraph_passes import attention

import qgraph.registry
from qgraph.cli import main
from qgraph.rewrite import Rule, RuleSet
from qgraph.rewrite_pass import RewritePass
from qgraph.verify.rule_check import check_rule, pairwise_cover, pattern_variants


def neg_neg_or_mul_one(op, x):
    return op.Neg(op.Neg(x)) | op.Mul(x, 1.0)


IDENTITY = Rule("drop-noop", neg_neg_or_mul_one, lambda op, x: op.Identity(x))
WRONG = Rule("wrong-noop", neg_neg_or_mul_one, lambda op, x: op.Neg(x))


def rms(op, x, w):
    mean = op.ReduceMean(op.Mul(x, x), op.const([-1]), keepdims=1)
    normed = op.Div(x, op.Sqrt(op.Add(mean, op.const(name="eps", pred=lambda a: a.size == 1 and 0 < float(a.reshape(-1)[0]) < 1e-2))))
    return op.Mul(op.optional(op.Cast(normed, to=1)), w, _commute=True)


def to_rms(op, x, w, eps):
    return op.RMSNormalization(x, w, epsilon=float(eps.reshape(-1)[0]), axis=-1)


RMS = Rule("rms", rms, to_rms, example_inputs={"w": (ir.DataType.FLOAT, ("H",))})


def test_variants_enumerate_every_alternative_combination():
    assert len(pattern_variants(IDENTITY)) == 2
    assert len(pattern_variants(RMS)) == 2  # with and without the optional Cast


def test_a_correct_rule_holds_on_every_variant():
    result = check_rule(IDENTITY)
    assert result.ok, str(result)
    assert [v.status for v in result.variants] == ["ok", "ok"]


def test_a_wrong_rule_fails_naming_each_variant():
    result = check_rule(WRONG)
    assert not result.ok
    assert [v.status for v in result.variants] == ["not-equivalent", "not-equivalent"]
    assert "FAIL wrong-noop" in str(result)


def test_rmsnorm_rule_with_predicate_constant_and_optional_cast_holds():
    result = check_rule(RMS)
    assert result.ok, str(result)


def test_epsilon_mutant_is_caught():
    wrong_eps = Rule("rms-eps", rms, lambda op, x, w: op.RMSNormalization(x, w, epsilon=1e-3, axis=-1),
                     example_inputs=RMS.example_inputs)
    assert not check_rule(wrong_eps).ok


def test_a_pattern_that_cannot_match_its_own_instance_is_reported():
    never = Rule("never", neg_neg_or_mul_one, lambda op, x: op.Identity(x), condition=lambda: "never matches")
    result = check_rule(never)
    assert [v.status for v in result.variants] == ["no-match", "no-match"]
    assert "never matches" in result.variants[0].detail


def test_unsatisfiable_constant_predicate_is_reported_not_guessed():
    def pattern(op, x):
        return op.Add(x, op.const(name="c", pred=lambda a: float(a.reshape(-1)[0]) == 123.25))

    def replacement(op, x, c):
        return op.Sub(x, op.const(-c))

    result = check_rule(Rule("odd-const", pattern, replacement))
    assert result.variants[0].status == "cannot-build"
    assert "example_values" in result.variants[0].detail
    fixed = Rule("odd-const", pattern, replacement, example_values={"c": np.float32(123.25)})
    assert check_rule(fixed).ok


class GoodRules(RewritePass):
    """Test pass with a correct rule."""

    name = "good-rules"
    rules = RuleSet([IDENTITY])


class BadRules(RewritePass):
    """Test pass with a wrong rule."""

    name = "bad-rules"
    rules = RuleSet([WRONG])


@pytest.mark.parametrize(("extra", "code"), [([GoodRules], 0), ([GoodRules, BadRules], 1)])
def test_verify_rules_command(monkeypatch, extra, code):
    registry = registry_with_test_passes()
    for cls in extra:
        registry.register(cls)
    monkeypatch.setattr(qgraph.registry, "_DEFAULT", registry)
    out = io.StringIO()
    assert main(["verify-rules", "--examples", "4"], out=out) == code
    text = out.getvalue()
    assert "PASS drop-noop" in text and "PASS double-neg" in text
    if code:
        assert "failing: wrong-noop" in text


# -- examples a rule gives for its self-check ----------------------------------------


def matmul_transposed(op, a, bt):
    return op.MatMul(a, bt)


def bt_is_transposed(match, bt):
    node = bt.producer()
    if node is None or node.op_type != "Transpose":
        return f"'{bt.name}' is not a Transpose"
    match["b"] = node.inputs[0]
    return None


def to_gemm(op, a, b):
    return op.Gemm(a, b, transB=1)


GEMM_EXAMPLE_INPUTS = {"a": (ir.DataType.FLOAT, ("M", "K")), "b": (ir.DataType.FLOAT, ("N", "K"))}


def test_a_variable_the_condition_looks_behind_is_built_by_its_example_subgraph():
    bare = Rule("gemm", matmul_transposed, to_gemm, bt_is_transposed, example_inputs=GEMM_EXAMPLE_INPUTS)
    (variant,) = check_rule(bare, examples=2).variants
    assert variant.status == "no-match" and "is not a Transpose" in variant.detail
    with_example = Rule("gemm", matmul_transposed, to_gemm, bt_is_transposed, example_inputs=GEMM_EXAMPLE_INPUTS,
                        example_values={"bt": lambda op, b: op.Transpose(b, perm=[1, 0])})
    result = check_rule(with_example, examples=2)
    assert result.ok, str(result)


def test_an_example_subgraph_that_needs_itself_is_reported():
    looping = Rule("gemm", matmul_transposed, to_gemm, bt_is_transposed,
                   example_values={"bt": lambda op, bt: op.Transpose(bt, perm=[1, 0])})
    (variant,) = check_rule(looping, examples=2).variants
    assert variant.status == "cannot-build" and "depends on 'bt' itself" in variant.detail


def cast_through(op, x):
    return op.Cast(op.Cast(x, to=op.capture("mid")), to=1)


def test_a_captured_attribute_without_default_takes_its_example_value():
    drop = lambda op, x: op.Identity(x)  # right only when the middle type loses nothing
    (variant,) = check_rule(Rule("cast-through", cast_through, drop)).variants
    assert variant.status == "cannot-build"
    assert "captured as 'mid'" in variant.detail and "example_values" in variant.detail
    assert check_rule(Rule("cast-through", cast_through, drop, example_values={"mid": int(ir.DataType.DOUBLE)})).ok
    lossy = check_rule(Rule("cast-through", cast_through, drop, example_values={"mid": int(ir.DataType.FLOAT16)}))
    assert [v.status for v in lossy.variants] == ["not-equivalent"]


# -- patterns with many combinations of alternatives ---------------------------------


@given(st.lists(st.integers(2, 3), min_size=1, max_size=6))
@settings(max_examples=25, deadline=None, derandomize=True)
def test_pairwise_cover_holds_every_pair_of_alternatives(sizes):
    variants = [dict(enumerate(combo)) for combo in itertools.product(*(range(n) for n in sizes))]
    chosen, covered, total = pairwise_cover(variants, limit=len(variants))
    assert covered == total
    assert all(c in variants for c in chosen)
    for (p, i), (q, j) in itertools.combinations([(p, i) for p, n in enumerate(sizes) for i in range(n)], 2):
        if p != q:
            assert any(c[p] == i and c[q] == j for c in chosen), (p, i, q, j)
    assert len(chosen) <= max(1, len(variants))


def three_optional_identities(op, x):
    y = op.optional(op.Identity(op.optional(op.Identity(op.optional(op.Identity(x))))))
    return op.Relu(y)


def test_a_rule_with_more_variants_than_the_budget_is_checked_on_a_pairwise_cover():
    rule = Rule("relu-of-identities", three_optional_identities, lambda op, x: op.Max(x, np.zeros((), np.float32)))
    result = check_rule(rule, examples=2, max_variants=5)
    assert result.ok, str(result)
    assert result.total_variants == 8 and 4 <= len(result.variants) <= 5
    assert "of 8 variants, covering every pair of alternatives" in str(result)
    wrong = Rule("relu-wrong", three_optional_identities, lambda op, x: op.Neg(x))
    assert {v.status for v in check_rule(wrong, examples=2, max_variants=5).variants} == {"not-equivalent"}


# -- the attention rules (their examples are a GQA layer) -----------------------------


@pytest.mark.parametrize("rule", list(attention.RULES), ids=lambda r: r.name)
def test_attention_rules_hold(rule):
    result = check_rule(rule, examples=2)
    assert result.ok, str(result)


def test_attention_rule_with_a_wrong_scale_is_caught():
    core = attention.RULES.get("attention-core")

    def doubled_scale(op, match, query, key, value_, key_format, scale, softcap, heads, mask_plan, mask_dims_ok,
                      layer, scope):
        return attention.to_attention(op, match, query, key, value_, key_format, 2 * scale, softcap, heads,
                                      mask_plan, mask_dims_ok, layer, scope)

    wrong = dataclasses.replace(core, name="attention-core-wrong-scale", replacement=doubled_scale, _graph=None)
    # A doubled scale only shows when the scores are not tiny and T > 1, so a
    # single variant's few draws may miss it; the rule as a whole must fail.
    result = check_rule(wrong, examples=4)
    assert not result.ok
    failing = [v for v in result.variants if v.status != "ok"]
    assert all(v.status == "not-equivalent" and "comparison FAILED" in v.detail for v in failing), str(result)


def test_every_builtin_rule_instance_holds_the_ops_the_engine_requires():
    """The engine skips a rule when the graph lacks one of its required ops; no instance of it may lack one."""
    from qgraph.rewrite_pass import RewritePass
    from qgraph.verify.rule_check import (
        CannotBuild,
        _build,
        pairwise_cover,
        pattern_variants,
    )

    registry = qgraph.registry.default_registry()
    rules = {rule.name: rule for name in registry.names() if issubclass(cls := registry.get(name), RewritePass)
             for rule in cls().rule_set()}
    assert {"rmsnorm", "attention-core", "rmsnorm-to-custom-rmsnorm"} <= set(rules)
    for rule in rules.values():
        variants = pattern_variants(rule)
        if len(variants) > 64:
            variants = pairwise_cover(variants, 64)[0]
        built = 0
        for choices in variants:
            try:
                model = _build(rule, choices)
            except CannotBuild:
                continue
            built += 1
            present = {(n.domain or "", n.op_type) for n in model.graph}
            assert rule.pattern_graph.required_ops() <= present, (rule.name, choices)
        assert built, rule.name


def test_a_rule_check_tolerance_loosens_only_that_rule_and_still_catches_a_wrong_replacement():
    """check_tolerance is for regrouped arithmetic; a replacement wrong by more than it still fails."""
    import numpy as np

    from qgraph.rewrite import Rule
    from qgraph.verify.rule_check import check_rule

    def scaled_twice(op, x):
        return op.Mul(op.Mul(x, op.const(3.0)), op.const(1.0 / 3.0))

    def off_by_5e_4(op, x):  # x * (1 + 5e-4): inside a 1e-3 tolerance, outside the default 1e-4
        return op.Mul(x, op.const(np.float32(1.0 + 5e-4)))

    def off_by_1_percent(op, x):
        return op.Mul(x, op.const(np.float32(1.01)))

    inputs = {"x": (ir.DataType.FLOAT, ("B", "H"))}
    assert not check_rule(Rule("tiny-off", scaled_twice, off_by_5e_4, example_inputs=inputs)).ok
    assert check_rule(Rule("tiny-off", scaled_twice, off_by_5e_4, example_inputs=inputs, check_tolerance=1e-3)).ok
    assert not check_rule(Rule("wrong", scaled_twice, off_by_1_percent, example_inputs=inputs,
                               check_tolerance=1e-3)).ok

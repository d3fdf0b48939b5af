"""Rule self-check: every variant of a rule's pattern is built, matched and compared."""

from __future__ import annotations

import io

import numpy as np
import onnx_ir as ir
import pytest

import qgraph.registry
from framework_passes import registry_with_test_passes
from qgraph.cli import main
from qgraph.rewrite import Rule, RuleSet
from qgraph.rewrite_pass import RewritePass
from qgraph.verify.rule_check import check_rule, pattern_variants


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

"""Rules are checked against the ONNX schemas when they are defined.

The trap: a misspelled op type in a pattern matched nothing, silently, and
``verify-rules`` then failed with an unrelated onnx-checker message.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import FLOAT, make_model

from qgraph.errors import RewriteError
from qgraph.rewrite import Rule, RuleSet, apply_rules
from qgraph.rewrite.schemas import RuleDefinitionError
from qgraph.verify.rule_check import check_rule


def test_misspelled_op_type_fails_at_definition_naming_rule_and_suggestion():
    with pytest.raises(RuleDefinitionError, match=r"rule 'relu-typo'.*'Rleu'.*did you mean 'Relu'"):
        Rule("relu-typo", lambda op, x: op.Rleu(op.Neg(x)), lambda op, x: op.Neg(x))


def test_misspelled_attribute_fails_at_definition():
    with pytest.raises(RuleDefinitionError, match=r"rule 'softmax-typo'.*Softmax.*'axsi'.*axis"):
        Rule("softmax-typo", lambda op, x: op.Softmax(x, axsi=-1), lambda op, x: op.Identity(x))


def test_an_op_newer_than_the_rules_opset_is_rejected():
    with pytest.raises(RuleDefinitionError, match=r"RMSNormalization.*opset 17"):
        Rule("too-new", lambda op, x, w: op.RMSNormalization(x, w), lambda op, x, w: op.Mul(x, w), opset=17)
    Rule("new-enough", lambda op, x, w: op.RMSNormalization(x, w), lambda op, x, w: op.Mul(x, w), opset=23)


def test_an_attribute_of_an_older_version_of_the_op_is_accepted():
    # ReduceMean's axes became an input at opset 18; exports at opset 17 still carry the attribute.
    Rule("old-reduce", lambda op, x: op.ReduceMean(x, axes=[-1], keepdims=1), lambda op, x: op.Identity(x))


def test_custom_domains_are_exempt():
    Rule("custom", lambda op, x: op.MyFancyOp(x, anything=1, _domain="com.example"), lambda op, x: op.Identity(x))


def test_misspelled_op_in_a_replacement_is_an_error_naming_the_rule():
    model = make_model(lambda op, x: op.Neg(op.Neg(x)), {"x": (FLOAT, ("B", 4))})
    rule = Rule("bad-replacement", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: op.Idnetity(x))
    with pytest.raises(RewriteError, match=r"rule 'bad-replacement'.*'Idnetity'.*Identity"):
        apply_rules(model, RuleSet([rule]))
    result = check_rule(rule)
    assert result.variants[0].status == "error" and "Idnetity" in result.variants[0].detail


def test_misspelled_attribute_in_a_replacement_is_an_error_naming_the_rule():
    model = make_model(lambda op, x: op.Neg(op.Neg(x)), {"x": (FLOAT, ("B", 4))})
    rule = Rule("bad-attr", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: op.Softmax(x, axsi=np.int64(-1)))
    with pytest.raises(RewriteError, match=r"rule 'bad-attr'.*'axsi'"):
        apply_rules(model, RuleSet([rule]))

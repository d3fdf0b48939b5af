"""Near misses are reported by default; the table says whether --verify ran and what it proved.

The trap: a pass that matched nothing said nothing unless one knew to run
``--explain``, and the CLI table looked the same with and without --verify.
"""

from __future__ import annotations

import io

import onnx
import pytest
from framework_passes import registry_with_test_passes, relu_neg_model

import qgraph.registry
from qgraph.cli import main
from qgraph.manager import PassManager
from qgraph.rewrite import Rule, RuleSet
from qgraph.rewrite_pass import RewritePass
from qgraph.verify import step_verifier


def neg_relu(op, x):
    return op.Relu(op.Neg(x))


def only_constants(x):
    return None if x.const_value is not None else f"'{x.name}' is not a constant"


class PickyPass(RewritePass):
    """A rule whose condition rejects what the model has (test pass)."""

    name = "picky"
    rules = RuleSet([Rule("neg-relu-const", neg_relu, lambda op, x: op.Relu(x), only_constants)])


class ElsewherePass(RewritePass):
    """A rule no candidate gets past the root of (test pass)."""

    name = "elsewhere"
    rules = RuleSet([Rule("relu-of-sigmoid", lambda op, x: op.Relu(op.Sigmoid(x)), lambda op, x: op.Sigmoid(x))])


def two_candidates_model():
    """Relu(Neg(x)) twice, added: two near misses of neg-relu-const (x is not a constant)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Neg", ["x"], ["n1"], name="neg1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Neg", ["x"], ["n2"], name="neg2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("Add", ["r1", "r2"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def run_manager(passes, model, verifier=None):
    registry = registry_with_test_passes()
    registry.register(PickyPass)
    registry.register(ElsewherePass)
    return PassManager(passes, registry=registry, verifier=verifier).run(model)


def load(proto):
    from qgraph import io as qio

    return qio.load(proto)


def test_near_misses_are_reported_by_default_with_the_most_common_check():
    report = run_manager(["picky"], load(two_candidates_model()))
    (record,) = report.passes
    assert record.near_misses == {
        "neg-relu-const": {"candidates": 2, "most_common_check": "'…' is not a constant", "times": 2}
    }
    (note,) = [n for n in record.notes if n.startswith("near miss")]
    assert "neg-relu-const" in note and "2 candidate(s)" in note and "is not a constant" in note
    assert "near miss" in report.format_table() and "is not a constant" in report.format_table()
    assert report.to_dict()["passes"][0]["near_misses"] == record.near_misses  # in --report too


def test_no_near_miss_when_no_candidate_gets_past_the_root():
    report = run_manager(["elsewhere"], load(two_candidates_model()))
    assert report.passes[0].near_misses == {}
    assert not any(n.startswith("near miss") for n in report.passes[0].notes)
    assert "near miss" not in report.format_table()


def test_table_says_when_verify_did_not_run():
    report = run_manager(["double-neg"], load(relu_neg_model(17)))
    table = report.format_table()
    assert "verified" in table.splitlines()[0]
    assert "not verified" in table


def test_table_shows_what_verify_proved_for_each_changed_pass():
    report = run_manager(["double-neg", "picky"], load(relu_neg_model(17)), verifier=step_verifier(examples=3))
    changed, unchanged = report.passes
    assert changed.verification == "same outputs on 3 drawn inputs (seed 0)"
    assert unchanged.verification is None  # nothing changed: nothing to prove
    table = report.format_table()
    assert "same outputs on 3 drawn inputs" in table
    assert "not verified" not in table
    assert report.to_dict()["passes"][0]["verification"] == changed.verification


@pytest.fixture
def cli_registry(monkeypatch):
    registry = registry_with_test_passes()
    registry.register(PickyPass)
    monkeypatch.delenv("QGRAPH_PLUGINS", raising=False)
    monkeypatch.setattr(qgraph.registry, "_DEFAULT", registry)


def test_cli_table_shows_near_misses_and_verification(cli_registry, tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(two_candidates_model(), source)
    out = io.StringIO()
    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "picky", "double-neg",
                 "--verify", "--verify-examples", "2"], out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "near miss" in text and "neg-relu-const" in text

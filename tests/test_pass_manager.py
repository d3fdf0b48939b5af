"""Pass manager: report, prerequisites, invariants, fixpoints and failures."""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
import pytest
from framework_passes import registry_with_test_passes, relu_neg_model

from qgraph.errors import BadInputError, InvariantViolation, PassFailure
from qgraph.invariants import InvariantChecker, find_violations
from qgraph.manager import PassManager
from qgraph.pass_base import default_opset
from qgraph.pipeline import Fixpoint


@pytest.fixture
def registry():
    return registry_with_test_passes()


def model(opset=17):
    return ir.from_proto(relu_neg_model(opset))


def test_report_records_each_pass_with_the_design_fields(registry, tmp_path):
    m = model(23)
    report = PassManager(["double-neg", "identity-elimination"], registry=registry).run(m)
    first, second = report.passes
    assert (first.name, first.changed, first.nodes_before, first.nodes_after) == ("double-neg", True, 4, 3)
    assert first.rule_matches == {"double-neg": 1}
    assert first.op_histogram == {"Identity": 2, "Relu": 1}
    assert second.name == "identity-elimination" and second.nodes_after == 1
    assert all(p.seconds >= 0 for p in report.passes)
    path = tmp_path / "r.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    for entry in data["passes"]:
        assert {"name", "seconds", "changed", "nodes_before", "nodes_after", "op_histogram"} <= set(entry)


def test_prerequisite_is_satisfied_by_running_its_provider_first(registry):
    m = model(17)
    report = PassManager(["needs-23"], registry=registry).run(m)
    assert [(p.name, p.prerequisite_of) for p in report.passes] == [("opset-upgrade", "needs-23"), ("needs-23", None)]
    # needs-23 saw opset 23 (it raises otherwise) but rewrote nothing, so the upgrade is taken back
    assert default_opset(m) == 17
    assert not report.passes[0].changed and report.passes[0].notes[-1] == "undone: 'needs-23' rewrote nothing"


def test_prerequisite_already_met_runs_nothing_extra(registry):
    report = PassManager(["needs-23"], registry=registry).run(model(23))
    assert [p.name for p in report.passes] == ["needs-23"]


def test_missing_prerequisite_without_provider_names_it(registry):
    with pytest.raises(BadInputError, match="needs-magic.*magic marker"):
        PassManager(["needs-magic"], registry=registry).run(model())


@pytest.mark.parametrize(
    ("pass_name", "message"),
    [
        ("break-dangling", "dangling value"),
        ("break-order", "not in topological order"),
        ("break-names", "used twice"),
    ],
)
def test_invariant_violation_names_the_pass(registry, pass_name, message):
    with pytest.raises(InvariantViolation, match=message) as err:
        PassManager(["double-neg", pass_name], registry=registry).run(model(23))
    assert err.value.pass_name == pass_name
    assert f"pass '{pass_name}'" in str(err.value)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        # A node's attribute replaced after the node was checked once.
        (["double-neg", "add-custom-op", "break-attribute"], "onnx checker: Relu 'relu': Unrecognized attribute: alpha"),
        # Unchanged nodes whose opset import went away.
        (["add-custom-op", "break-imports"], "onnx checker: Twist 'twist': No opset import for domain 'test.custom'"),
        (["double-neg", "break-output-type"], "onnx checker: graph output 'y'"),
    ],
)
def test_onnx_checker_runs_again_on_what_a_later_pass_changed(registry, steps, message):
    """The manager onnx-checks only changed nodes; a change made after a node's first check is still caught."""
    with pytest.raises(InvariantViolation, match=message) as err:
        PassManager(steps, registry=registry).run(model(23))
    assert err.value.pass_name == steps[-1]


def test_an_opset_change_rechecks_the_unchanged_nodes_it_affects(registry):
    m = ir.from_proto(onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[N, 4] x) => (float[N, 4] y) <float[4] s = {1, 1, 1, 1}> {
          n1 = Neg(x)
          n2 = Neg(n1)
          r = Relu(n2)
          y = RMSNormalization<axis = -1>(r, s)
        }
    """))
    with pytest.raises(InvariantViolation, match="RMSNormalization.*No Op registered for RMSNormalization") as err:
        PassManager(["double-neg", "break-opset"], registry=registry).run(m)
    assert err.value.pass_name == "break-opset"


def test_what_the_input_had_is_not_blamed_on_a_pass_but_a_pass_touching_it_is(registry):
    proto = relu_neg_model(23)
    proto.graph.node[2].attribute.append(onnx.helper.make_attribute("beta", 2.0))  # Relu has no 'beta'
    assert find_violations(ir.from_proto(proto))  # the whole-model checker sees it
    PassManager(["double-neg"], registry=registry).run(ir.from_proto(proto))
    with pytest.raises(InvariantViolation, match="Relu 'relu'.*Unrecognized attribute"):
        PassManager(["break-attribute"], registry=registry).run(ir.from_proto(proto))


@pytest.mark.parametrize("broken", ["break-attribute", "break-imports", "break-output-type", "break-dangling",
                                    "break-order", "break-names"])
def test_incremental_checks_agree_with_the_whole_model_checker(registry, broken):
    m = model(23)
    checker = InvariantChecker()
    for name in ("double-neg", "add-custom-op"):
        registry.create(name, {})(m)
        assert checker(m) == [] and find_violations(m) == []
    registry.create(broken, {})(m)
    assert checker(m) and find_violations(m)


def test_invariants_can_be_switched_off(registry):
    PassManager(["break-order"], registry=registry, check_invariants=False).run(model(23))


def test_exception_inside_a_pass_becomes_a_failure_naming_it(registry):
    with pytest.raises(PassFailure, match="pass 'crash' failed: ZeroDivisionError: boom") as err:
        PassManager(["crash"], registry=registry).run(model())
    assert err.value.exit_code == 1


def test_fixpoint_repeats_until_nothing_changes(registry):
    pipeline = [Fixpoint([("countdown", {"times": 2})], max_iterations=5)]
    report = PassManager(pipeline, registry=registry).run(model())
    assert [p.fixpoint_iteration for p in report.passes] == [1, 2, 3]
    assert [p.changed for p in report.passes] == [True, True, False]
    assert report.warnings == []


def test_fixpoint_bound_is_respected_and_reported(registry):
    pipeline = [Fixpoint([("countdown", {"times": 10})], max_iterations=3)]
    report = PassManager(pipeline, registry=registry).run(model())
    assert len(report.passes) == 3
    assert "after 3 iterations" in report.warnings[0]


def test_bad_names_and_options_fail_before_the_model_is_touched(registry):
    with pytest.raises(BadInputError, match="unknown pass 'double-nag'.*did you mean 'double-neg'"):
        PassManager(["double-nag"], registry=registry)
    with pytest.raises(BadInputError, match="pass 'countdown' has no option 'tims'"):
        PassManager([("countdown", {"tims": 1})], registry=registry)
    with pytest.raises(BadInputError, match="countdown.times.*int"):
        PassManager([("countdown", {"times": "many"})], registry=registry)


def test_verifier_is_called_only_for_changed_steps_with_the_model_before(registry):
    calls = []

    def verifier(before, after, pass_name):
        calls.append((pass_name, [n.op_type for n in before.graph], [n.op_type for n in after.graph]))

    PassManager(["needs-23", "double-neg"], registry=registry, verifier=verifier).run(model(23))
    assert calls == [("double-neg", ["Neg", "Neg", "Relu", "Identity"], ["Identity", "Relu", "Identity"])]


def test_verifier_is_told_a_pass_s_declared_meaning(registry):
    """A pass whose meaning is not "outputs" (fp16-clip, kv-cache) is verified by that meaning."""
    from framework_passes import DoubleNegPass

    class DoubleNegFp16(DoubleNegPass):
        name = "double-neg-fp16"
        meaning = "fp16"

    registry.register(DoubleNegFp16)
    calls = []

    def verifier(before, after, pass_name, meaning="outputs"):
        calls.append((pass_name, meaning))

    PassManager(["double-neg-fp16"], registry=registry, verifier=verifier).run(model(23))
    PassManager(["double-neg"], registry=registry, verifier=verifier).run(model(23))
    assert calls == [("double-neg-fp16", "fp16"), ("double-neg", "outputs")]


def test_rewrite_pass_stamps_created_nodes_with_pass_and_rule(registry):
    m = model(23)
    PassManager(["double-neg"], registry=registry).run(m)
    (identity,) = [n for n in m.graph if n.op_type == "Identity" and n.metadata_props]
    assert identity.metadata_props == {"qgraph.rule": "double-neg", "qgraph.pass": "double-neg"}


@pytest.mark.parametrize("explicit_version", [False, True])
def test_an_upgrade_that_only_renumbers_is_undone_without_copying_the_model(registry, monkeypatch, explicit_version):
    """opset-upgrade takes its own renumbering back (undo_for); the model comes out as it went in."""
    m = model(18)  # onnxscript's converter starts at 18
    if explicit_version:
        next(iter(m.graph)).version = 18
    before = ir.serde.serialize_model(m).SerializeToString(deterministic=True)
    versions = [n.version for n in m.graph]  # in memory only: a NodeProto has no version

    def no_copy(self, *args, **kwargs):
        raise AssertionError("the pass manager copied the whole model")

    monkeypatch.setattr(ir.Model, "clone", no_copy)
    report = PassManager(["needs-23"], registry=registry).run(m)
    assert report.passes[0].name == "opset-upgrade" and "undone" in report.passes[0].notes[-1]
    assert ir.serde.serialize_model(m).SerializeToString(deterministic=True) == before
    assert [n.version for n in m.graph] == versions


def test_an_upgrade_that_converts_nodes_is_undone_from_a_copy(registry):
    """Softmax changed meaning at opset 13 (an adapter rewrites it): no self-undo, the copy restores it."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 12]>
        g (float[2, 3] X) => (float[2, 3] Y) {
          Y = Softmax<axis = 1>(X)
        }
    """)
    m = ir.from_proto(proto)
    before = ir.serde.serialize_model(m).SerializeToString(deterministic=True)
    upgrade = registry.create("opset-upgrade", {"target": 23})
    assert upgrade.undo_for(m) is None
    report = PassManager(["needs-23"], registry=registry).run(m)
    assert report.passes[0].name == "opset-upgrade" and "undone" in report.passes[0].notes[-1]
    assert ir.serde.serialize_model(m).SerializeToString(deterministic=True) == before

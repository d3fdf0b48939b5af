"""The rmsnorm fusion on small graphs: every spelling fuses, every near-miss is reported, meaning is kept."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qgraph_passes import rmsnorm, rmsnorm_lowering
from rmsnorm_graphs import FLAWS, Spec, build, rms_norm_specs

import qgraph
from qgraph.verify.rule_check import check_rule

_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def fuse(model: onnx.ModelProto):
    """Run ``rmsnorm`` through the pass manager (so its prerequisites run too); returns (model, its record)."""
    fused, report = qgraph.optimize_with_report(model, ["rmsnorm"])
    return fused, next(p for p in report.passes if p.name == "rmsnorm")


def count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def tolerance(spec: Spec) -> dict[str, float]:
    # float16 results differ in the last bits between the decomposed graph and
    # onnxruntime's kernel (which keeps the product with the scale in float32).
    return {"rtol": 2e-2, "atol": 2e-2} if spec.dtype == "float16" else {"rtol": 1e-5, "atol": 1e-5}


@_SETTINGS
@given(spec=rms_norm_specs(), data=st.data())
def test_fuses_exactly_the_rms_norms_and_keeps_the_outputs(spec, data):
    model = build(spec)
    fused, record = fuse(model)
    assert count(fused, "RMSNormalization") == (1 if spec.fusable else 0), record.notes
    if spec.fusable:
        # Nothing of the norm is left: no reduction, no square root.
        assert count(fused, "ReduceMean") == 0 and count(fused, "Sqrt") == 0
        assert record.notes == []
    else:
        assert len(record.notes) == 1 and "not fused" in record.notes[0], record.notes
    assert_equivalent(model, fused, examples=3, data=data, **tolerance(spec))


@pytest.mark.parametrize(
    "flaw, reason",
    [
        ("reduce-other-axis", "not the last axis"),
        ("vector-eps", "epsilon 'eps' has 8 elements, not one"),
        ("eps-input", "epsilon 'eps' is not a constant"),
        ("shared-rms", "is a graph output"),
        ("broadcasting-scale", "broadcast x (rank 3) to a higher rank"),
    ],
)
def test_a_near_miss_is_reported_with_the_node_and_the_failed_check(flaw, reason):
    assert flaw in FLAWS
    _, record = fuse(build(Spec(flaw=flaw)))
    (note,) = record.notes
    assert "ReduceMean 'ReduceMean_" in note and reason in note, note


def test_float16_upcast_keeps_float32_accumulation():
    """Llama in float16 casts up for the mean: the canonical op must say stash_type=float32."""
    fused, _ = fuse(build(Spec(dtype="float16", upcast=True)))
    (node,) = [n for n in fused.graph.node if n.op_type == "RMSNormalization"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["stash_type"] == onnx.TensorProto.FLOAT
    assert attrs["axis"] == -1 and np.isclose(attrs["epsilon"], 1e-5)
    assert count(fused, "Cast") == 0  # both Casts are inside the op's definition


def test_gemma_upcast_scale_is_applied_in_float32():
    """Gemma multiplies by (1 + w) in float32, then casts: the op takes Cast(x) and the folded scale."""
    spec = Spec(dtype="float16", upcast=True, scale_form="one-plus-weight")
    model = build(spec)
    fused, record = fuse(model)
    assert record.rule_matches == {"rmsnorm-one-plus-weight": 1}
    (node,) = [n for n in fused.graph.node if n.op_type == "RMSNormalization"]
    scale = next(t for t in fused.graph.initializer if t.name == node.input[1])
    weight = next(t for t in model.graph.initializer if t.name == "w")
    expected = onnx.numpy_helper.to_array(weight).astype(np.float32) + np.float32(1)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(scale), expected)
    assert "one_w" not in {t.name for t in fused.graph.initializer}  # the Add is gone


def test_torchscript_style_graph_fuses_through_the_prerequisites():
    """Opset 17, axes as an attribute, no value types: the manager upgrades and infers first."""
    model = build(Spec(opset=17, upcast=True, inverse="div-one"))
    assert not model.graph.value_info
    fused, report = qgraph.optimize_with_report(model, ["rmsnorm"])
    ran = [(p.name, p.prerequisite_of) for p in report.passes]
    assert ran == [("opset-upgrade", "rmsnorm"), ("shape-inference", "rmsnorm"), ("rmsnorm", None)]
    assert count(fused, "RMSNormalization") == 1 and count(fused, "Cast") == 0


def test_an_intermediate_used_elsewhere_blocks_only_what_it_must():
    """A shared Cast(x) (Gemma2's TorchScript export reuses it for the residual) stays; the norm still fuses."""
    model = build(Spec(upcast=True))
    cast = next(n for n in model.graph.node if n.op_type == "Cast")
    residual = next(n for n in model.graph.node if n.op_type == "Add" and n.output[0] == model.graph.output[0].name)
    residual.input[1] = cast.output[0]
    fused, _ = fuse(model)
    assert count(fused, "RMSNormalization") == 1
    assert count(fused, "Cast") == 1
    assert_equivalent(model, fused, examples=5)


ALL_RULES = [*rmsnorm.RULES, *rmsnorm_lowering.RULES.values()]


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_every_rule_holds_on_its_own(rule):
    result = check_rule(rule, examples=2)
    assert result.ok, str(result)


def test_the_rule_check_catches_a_wrong_epsilon():
    """The self-check is not vacuous: a rule that drops epsilon fails it."""
    import dataclasses

    wrong = dataclasses.replace(
        rmsnorm.RULES.get("rmsnorm"),
        name="rmsnorm-wrong-eps",
        replacement=lambda op, x, scale, axis, stash_type, x_to: op.RMSNormalization(
            x, scale, epsilon=0.5, axis=axis, stash_type=stash_type
        ),
        _graph=None,
    )
    result = check_rule(wrong, examples=2, max_variants=2)
    assert not result.ok
    assert {v.status for v in result.variants} == {"not-equivalent"}


def test_gemma_upcast_with_a_runtime_scale_casts_x_into_the_op():
    """(1 + w) with w not a constant: nothing to fold, the scale is applied in float32 to Cast(x)."""
    model = build(Spec(dtype="float16", upcast=True, scale_form="one-plus-activation"))
    fused, record = fuse(model)
    assert record.rule_matches == {"rmsnorm": 1}
    (node,) = [n for n in fused.graph.node if n.op_type == "RMSNormalization"]
    cast = next(n for n in fused.graph.node if n.output[0] == node.input[0])
    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    assert_equivalent(model, fused, examples=5, **tolerance(Spec(dtype="float16")))

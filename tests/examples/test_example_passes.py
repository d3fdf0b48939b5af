"""The three worked passes of docs/writing-passes.md, loaded from their files as the guide loads them.

Each one: its rules hold under the rule self-check at the default settings;
a property test (hypothesis draws sizes, spellings and weights) shows the
pass rewrites every instance and keeps the outputs; and the guide's own
commands run it on a tiny zoo model with ``--verify``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph.cli import main
from qgraph.manager import PassManager
from qgraph.plugins import load_plugin
from qgraph.registry import Registry
from qgraph.verify import check_equivalent
from qgraph.verify.rule_check import check_rule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "passes"
FLOAT = ir.DataType.FLOAT
PROPERTY = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.nested_given])


def registry_with(example: str) -> Registry:
    """The installed passes plus the example, loaded from its file as --plugin does."""
    registry = Registry()
    load_plugin(str(EXAMPLES / f"{example}.py"), registry)
    return registry


@pytest.mark.parametrize(("example", "pass_name"), [
    ("gelu_fusion", "gelu-fusion"), ("qkv_merge", "qkv-merge"), ("silu_custom_op", "silu-to-swish"),
])
def test_the_example_rules_hold_under_the_default_self_check(example, pass_name):
    cls = registry_with(example).get(pass_name)
    for rule in cls().rule_set():
        result = check_rule(rule)
        assert result.ok, str(result)


def _model(build, inputs, opset):
    values = [ir.val(name, dtype, ir.Shape(shape)) for name, (dtype, shape) in inputs.items()]
    graph = ir.Graph(values, [], nodes=[], opset_imports={"": opset}, name="g")
    tape = ir.tape.Tape(graph)
    outputs = build(tape, *values)
    for i, out in enumerate(outputs):
        out.name = f"out{i}"
    graph.outputs.extend(outputs)
    model = ir.Model(graph, ir_version=10)
    ir.passes.common.ShapeInferencePass()(model)
    return model


def _const(tape, value):
    return tape.initializer(ir.tensor(np.asarray(value, dtype=np.float32), name=f"c{len(tape.initializers)}"))


def _run_pass(example, pass_name, model):
    reference = model.clone()
    report = PassManager([pass_name], registry=registry_with(example)).run(model)
    verdict = check_equivalent(reference, model, examples=5, save_artifacts=False)
    assert verdict.equivalent, str(verdict)
    return report


def ops(model):
    return [node.op_type for node in model.graph]


@PROPERTY
@given(hidden=st.integers(1, 16), layers=st.integers(1, 3), scale_first=st.booleans(), cube=st.sampled_from(["pow", "mul"]))
def test_gelu_fusion_fuses_every_spelled_out_gelu_and_keeps_the_outputs(hidden, layers, scale_first, cube):
    def build(tape, x):
        h = x
        for _ in range(layers):
            if cube == "pow":
                cubed = tape.op("Pow", [h, _const(tape, 3.0)])
            else:
                cubed = tape.op("Mul", [tape.op("Mul", [h, h]), h])
            inner = tape.op("Mul", [_const(tape, 0.7978845608), tape.op("Add", [h, tape.op("Mul", [_const(tape, 0.044715), cubed])])])
            one_plus = tape.op("Add", [tape.op("Tanh", [inner]), _const(tape, 1.0)])
            if scale_first:
                h = tape.op("Mul", [tape.op("Mul", [_const(tape, 0.5), h]), one_plus])
            else:
                h = tape.op("Mul", [h, tape.op("Mul", [_const(tape, 0.5), one_plus])])
        return [h]

    model = _model(build, {"x": (FLOAT, ("B", hidden))}, opset=18)
    report = _run_pass("gelu_fusion", "gelu-fusion", model)
    assert ops(model).count("Gelu") == layers and "Tanh" not in ops(model)
    assert [p.name for p in report.passes] == ["opset-upgrade", "gelu-fusion"]  # the prerequisite ran


@PROPERTY
@given(hidden=st.integers(1, 12), q=st.integers(1, 12), kv=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_qkv_merge_merges_the_three_projections_and_keeps_the_outputs(hidden, q, kv, seed):
    rng = np.random.default_rng(seed)

    def build(tape, x):
        weights = [rng.standard_normal((hidden, n)).astype(np.float32) for n in (q, kv, kv)]
        return [tape.op("Relu", [tape.op("MatMul", [x, _const(tape, w)])]) for w in weights]

    model = _model(build, {"x": (FLOAT, ("B", "S", hidden))}, opset=18)
    _run_pass("qkv_merge", "qkv-merge", model)
    assert ops(model).count("MatMul") == 1 and ops(model).count("Split") == 1


@PROPERTY
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), commuted=st.booleans(), uses=st.integers(1, 3))
def test_silu_becomes_the_custom_op_with_a_body_that_is_left_alone(shape, commuted, uses):
    def build(tape, x):
        outs = []
        for _ in range(uses):
            h = tape.op("Neg", [x])
            sig = tape.op("Sigmoid", [h])
            outs.append(tape.op("Mul", [sig, h] if commuted else [h, sig]))
        return outs

    model = _model(build, {"x": (FLOAT, tuple(shape))}, opset=18)
    _run_pass("silu_custom_op", "silu-to-swish", model)
    assert ops(model).count("Swish") == uses and "Sigmoid" not in ops(model)
    (body,) = model.functions.values()
    assert [n.op_type for n in body] == ["Sigmoid", "Mul"]  # never rewritten into a call of itself


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "example", "pass_name", "fused_op"), [
    ("gemma", "gelu_fusion", "gelu-fusion", "Gelu"),
    ("llama", "qkv_merge", "qkv-merge", "Split"),
    ("llama", "silu_custom_op", "silu-to-swish", "Swish"),
])
def test_the_guides_commands_run_each_example_on_a_zoo_model(tiny_zoo, tmp_path, arch, example, pass_name, fused_op):
    import onnx

    exported = tiny_zoo.export(arch, "dynamo").output_dir / "model.onnx"
    plugin, target = str(EXAMPLES / f"{example}.py"), tmp_path / "out.onnx"
    out = io.StringIO()
    assert main(["verify-rules", "--plugin", plugin, "--rule", pass_name if pass_name != "gelu-fusion" else "gelu-tanh"],
                out=out) == 0, out.getvalue()
    out = io.StringIO()
    code = main(["optimize", str(exported), "-o", str(target), "--plugin", plugin, "--passes", pass_name, "--verify"],
                out=out)
    assert code == 0, out.getvalue()
    assert "same outputs on" in out.getvalue()
    assert fused_op in [n.op_type for n in onnx.load(target).graph.node]

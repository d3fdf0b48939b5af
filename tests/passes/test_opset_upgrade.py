"""Tests of opset-upgrade: conversions keep meaning, failures raise and leave the model alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import assert_equivalent, op_types, parse, proto_of
from onnxscript.version_converter import _version_converter
from qgraph_passes.opset_upgrade import OpsetUpgradePass, opset_at_least

from qgraph.errors import BadInputError
from qgraph.pass_base import default_opset

REDUCE_MEAN_17 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 6] X) => (float[N, 4, 1] Y, float[N, 6] Z) {
  Y = ReduceMean<axes = [-1], keepdims = 1>(X)
  Z = ReduceMax<axes = [1], keepdims = 0>(X)
}
"""

SPLIT_SQUEEZE_11 = """
<ir_version: 6, opset_import: ["" : 11]>
g (float[N, 4, 6] X) => (float[N, 6] A, float[N, 3, 6] B, float[N, 1, 4, 6] C) {
  a, B = Split<axis = 1, split = [1, 3]>(X)
  A = Squeeze<axes = [1]>(a)
  C = Unsqueeze<axes = [1]>(X)
}
"""


def _signature(model: ir.Model) -> tuple:
    """What the caller can observe: opset, IR version, nodes (by identity) and their attributes."""
    return (
        dict(model.opset_imports),
        model.ir_version,
        [(node, node.op_type, len(node.inputs), sorted(node.attributes)) for node in model.graph],
        list(model.functions),
    )


def test_reduce_mean_axes_attribute_becomes_an_input_from_17_to_23():
    model = parse(REDUCE_MEAN_17)
    before = proto_of(model)
    upgrade = OpsetUpgradePass()  # target 23 by default

    assert upgrade(model).modified
    assert default_opset(model) == 23
    reduce_mean = next(n for n in model.graph if n.op_type == "ReduceMean")
    assert "axes" not in reduce_mean.attributes
    assert len(reduce_mean.inputs) == 2
    np.testing.assert_array_equal(ir.convenience.get_const_tensor(reduce_mean.inputs[1]).numpy(), [-1])
    assert model.ir_version >= onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", 23)])
    assert "default-domain opset 17 -> 23" in upgrade.report.notes
    onnx.checker.check_model(proto_of(model), full_check=True)
    assert_equivalent(before, model)


def test_split_and_squeeze_attributes_become_inputs_from_11_to_23():
    model = parse(SPLIT_SQUEEZE_11)
    before = proto_of(model)
    assert OpsetUpgradePass(target=23)(model).modified
    by_op = {n.op_type: n for n in model.graph}
    assert "split" not in by_op["Split"].attributes and len(by_op["Split"].inputs) == 2
    assert "axes" not in by_op["Squeeze"].attributes and len(by_op["Squeeze"].inputs) == 2
    assert "axes" not in by_op["Unsqueeze"].attributes and len(by_op["Unsqueeze"].inputs) == 2
    onnx.checker.check_model(proto_of(model), full_check=True)
    assert_equivalent(before, model)


def test_already_at_target_is_a_no_op():
    model = parse(REDUCE_MEAN_17)
    signature = _signature(model)
    assert not OpsetUpgradePass(target=17)(model).modified
    assert _signature(model) == signature
    assert OpsetUpgradePass(target=23)(model).modified
    assert not OpsetUpgradePass(target=23)(model).modified


def test_onnxscript_path_from_18_upwards_keeps_meaning():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 4] X) => (float[N, 1] Y) <int64[1] axes = {1}> {
          r = ReduceMax<keepdims = 1>(X, axes)
          Y = Relu(r)
        }
        """
    )
    before = proto_of(model)
    assert OpsetUpgradePass(target=23)(model).modified
    assert default_opset(model) == 23
    assert all(n.version in (None, 23) for n in model.graph)
    assert_equivalent(before, model)


RENUMBERED_ONLY = [
    # No onnxscript adapter between 18 and 23 for any of these ops.
    """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 4] X) => (float[N, 1] Y) <int64[1] axes = {1}> {
      r = ReduceMax<keepdims = 1>(X, axes)
      Y = Relu(r)
    }
    """,
    # A custom op whose body reads the same at both opsets is kept, not inlined.
    """
    <ir_version: 8, opset_import: ["" : 18, "com.qti.test" : 1]>
    g (float[N, 4] X) => (float[N, 4] Y) { s = com.qti.test.Square(X)  Y = Softmax<axis = -1>(s) }

    <domain: "com.qti.test", opset_import: ["" : 18]>
    Square (x) => (y) { y = Mul(x, x) }
    """,
]


@pytest.mark.parametrize("text", RENUMBERED_ONLY)
def test_renumbering_in_place_gives_what_the_converter_gives(text, monkeypatch):
    """When no adapter applies the pass only renumbers (no clone); the result must equal the converter's."""
    import qgraph_passes.opset_upgrade as module

    assert module._only_renumbers(parse(text), 18, 23)
    fast = parse(text)
    graph = fast.graph
    assert OpsetUpgradePass(target=23)(fast).modified
    assert fast.graph is graph  # converted in place
    monkeypatch.setattr(module, "_only_renumbers", lambda *args: False)
    slow = parse(text)
    assert OpsetUpgradePass(target=23)(slow).modified
    assert slow.graph is not graph
    assert proto_of(fast) == proto_of(slow)
    onnx.checker.check_model(proto_of(fast), full_check=True)
    assert_equivalent(proto_of(parse(text)), fast)


def test_an_op_with_an_adapter_on_the_way_is_not_just_renumbered():
    group_norm = """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[1, 4, 3] X) => (float[1, 4, 3] Y) <float[2] s = {1, 1}, float[2] b = {0, 0}> {
          Y = GroupNormalization<num_groups = 2>(X, s, b)
        }
    """
    import qgraph_passes.opset_upgrade as module

    assert not module._only_renumbers(parse(group_norm), 18, 23)
    assert module._only_renumbers(parse(group_norm), 18, 20)


def test_downgrade_works_where_onnx_has_the_adapter():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 4] X) => (float[N] Y) <int64[1] axes = {1}> { Y = ReduceMean<keepdims = 0>(X, axes) }
        """
    )
    before = proto_of(model)
    assert OpsetUpgradePass(target=17)(model).modified
    (reduce_mean,) = model.graph
    assert list(reduce_mean.attributes["axes"].as_ints()) == [1]
    assert_equivalent(before, model)


def test_unknown_target_raises_bad_input_and_leaves_the_model():
    model = parse(REDUCE_MEAN_17)
    signature = _signature(model)
    with pytest.raises(BadInputError, match=r"pass 'opset-upgrade'.* from 17 to 99"):
        OpsetUpgradePass(target=99)(model)
    assert _signature(model) == signature


def test_op_without_adapter_raises_naming_the_op_and_leaves_the_model():
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[N, 6] X) => (float[N, 6] Y) <float[6] s = {1, 1, 1, 1, 1, 1}> {
          r = Relu(X)
          Y = RMSNormalization<axis = -1>(r, s)
        }
        """
    )
    signature = _signature(model)
    with pytest.raises(BadInputError) as error:
        OpsetUpgradePass(target=17)(model)
    message = str(error.value)
    assert "opset-upgrade" in message and "from 23 to 17" in message
    assert "at op RMSNormalization" in message
    assert _signature(model) == signature


def test_adapter_failure_inside_onnxscript_is_not_silently_skipped(monkeypatch):
    # onnxscript logs a failing adapter and carries on, leaving the node with
    # its old meaning under the new opset; the pass must refuse that.
    def failing_adapter(node, op):
        raise _version_converter.VersionConverterError("cannot convert this Relu")

    monkeypatch.setitem(_version_converter.registry.op_adapters, ("", "Relu", 19, True), failing_adapter)
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 4] X) => (float[N, 4] Y) { a = Neg(X)  Y = Relu(a) }
        """
    )
    signature = _signature(model)
    with pytest.raises(BadInputError, match=r"from 18 to 23 at op Relu.*cannot convert this Relu"):
        OpsetUpgradePass(target=23)(model)
    assert _signature(model) == signature


def test_group_norm_with_dynamic_channels_is_refused():
    # onnxscript would keep the node unchanged, reading per-group scales as per-channel.
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, C, 6] X) => (float[N, C, 6] Y) <float[2] s = {1, 2}, float[2] b = {0, 1}> {
          Y = GroupNormalization<num_groups = 2>(X, s, b)
        }
        """
    )
    with pytest.raises(BadInputError, match="at op GroupNormalization"):
        OpsetUpgradePass(target=23)(model)
    assert default_opset(model) == 18


def test_group_norm_with_static_channels_converts():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 4, 6] X) => (float[N, 4, 6] Y) <float[2] s = {1, 2}, float[2] b = {0, 1}> {
          Y = GroupNormalization<num_groups = 2>(X, s, b)
        }
        """
    )
    before = proto_of(model)
    assert OpsetUpgradePass(target=21)(model).modified
    assert op_types(model).count("GroupNormalization") == 1
    assert_equivalent(before, model, rtol=1e-4, atol=1e-4)


def test_local_functions_are_inlined_and_custom_domains_kept():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1, "local" : 1]>
        g (float[N, 4] X) => (float[N, 1] Y) {
          a = com.microsoft.Gelu(X)
          b = local.MeanLast(a)
          Y = Relu(b)
        }

        <domain: "local", opset_import: ["" : 17]>
        MeanLast (x) => (y) { y = ReduceMean<axes = [-1]>(x) }
        """
    )
    before = proto_of(model)
    upgrade = OpsetUpgradePass(target=23)
    assert upgrade(model).modified
    assert op_types(model) == ["Gelu", "Constant", "ReduceMean", "Relu"]
    assert not model.functions
    assert model.opset_imports == {"": 23, "com.microsoft": 1}
    assert "inlined 1 model-local function(s)" in upgrade.report.notes
    assert_equivalent(before, model)


def test_custom_op_functions_written_the_same_at_the_target_are_kept():
    """A device custom op (a function whose body reads the same at 17 and 23) survives a downgrade."""
    model = parse(
        """
        <ir_version: 9, opset_import: ["" : 23, "com.qti.test" : 1]>
        g (float[N, 4] X) => (float[N, 1] Y, float[N, 1] Z) <int64[1] axes = {-1}> {
          Y = com.qti.test.SumSquares(X)
          Z = ReduceMean(X, axes)
        }

        <domain: "com.qti.test", opset_import: ["" : 23]>
        SumSquares (x) => (y) {
          sq = Mul(x, x)
          axes = Constant<value_ints = [-1]>()
          y = ReduceSum<keepdims = 1>(sq, axes)
        }
        """
    )
    before = proto_of(model)
    assert OpsetUpgradePass(target=17)(model).modified
    (function,) = model.functions.values()
    assert function.name == "SumSquares"
    assert function.opset_imports[""] == 17
    assert model.opset_imports == {"": 17, "com.qti.test": 1}
    assert [n.op_type for n in model.graph if n.op_type == "SumSquares"] == ["SumSquares"]
    onnx.checker.check_model(proto_of(model), full_check=True)
    assert_equivalent(before, model)


def test_downgrade_below_18_drops_a_default_noop_with_empty_axes():
    """The dynamo exporter spells out noop_with_empty_axes=0; opset 17 has no such attribute."""
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 4, 6] X) => (float[N, 4, 1] Y) <int64[1] axes = {-1}> {
          Y = ReduceMean<keepdims = 1, noop_with_empty_axes = 0>(X, axes)
        }
        """
    )
    before = proto_of(model)
    assert OpsetUpgradePass(target=17)(model).modified
    (node,) = [n for n in model.graph if n.op_type == "ReduceMean"]
    assert "noop_with_empty_axes" not in node.attributes
    assert list(node.attributes["axes"].as_ints()) == [-1]
    onnx.checker.check_model(proto_of(model), full_check=True)
    assert_equivalent(before, model)


def test_downgrade_keeps_ops_the_converter_has_no_adapter_for_when_written_the_same():
    """ConstantOfShape 20 only added types: onnx has no 20 -> 19 adapter, the node stays as written."""
    model = parse(
        """
        <ir_version: 9, opset_import: ["" : 23]>
        g (float[N, 4] X) => (float[N, 4] Y, float[N, 1] Z) <int64[1] axes = {-1}> {
          shape = Shape(X)
          fill = ConstantOfShape<value = float[1] {2.0}>(shape)
          Y = Mul(X, fill)
          Z = ReduceMean(X, axes)
        }
        """
    )
    before = proto_of(model)
    upgrade = OpsetUpgradePass(target=17)
    assert upgrade(model).modified
    assert default_opset(model) == 17
    assert any("ConstantOfShape" in note for note in upgrade.report.notes)
    assert "axes" in next(n for n in model.graph if n.op_type == "ReduceMean").attributes
    onnx.checker.check_model(proto_of(model), full_check=True)
    assert_equivalent(before, model)


def test_downgrade_below_18_spells_split_num_outputs_as_sizes():
    """Split 18's num_outputs (GPT-2's fused c_attn, uneven here) has no opset-17 form but explicit sizes."""
    model = parse(
        """
        <ir_version: 9, opset_import: ["" : 23]>
        g (float[N, 7] X) => (float[N, 3] A, float[N, 3] B, float[N, 1] C) {
          A, B, C = Split<axis = 1, num_outputs = 3>(X)
        }
        """
    )
    before = proto_of(model)
    upgrade = OpsetUpgradePass(target=17)
    assert upgrade(model).modified
    (split,) = [n for n in model.graph if n.op_type == "Split"]
    assert "num_outputs" not in split.attributes
    assert split.inputs[1].const_value.numpy().tolist() == [3, 3, 1]
    onnx.checker.check_model(proto_of(model), full_check=True)
    assert_equivalent(before, model)


def test_external_weights_stay_on_disk(tmp_path):
    big = ", ".join(["0.25"] * 600)
    model = parse(
        REDUCE_MEAN_17.replace("=> (", "=> (float[N, 4, 100] M, ").replace(
            "{\n", f"<float[6, 100] W = {{{big}}}>\n{{\n  M = MatMul(X, W)\n"
        )
    )
    ir.save(model, tmp_path / "m.onnx", external_data="m.data")
    model = ir.load(tmp_path / "m.onnx")
    weight = model.graph.initializers["W"].const_value
    assert isinstance(weight, ir.ExternalTensor)

    assert OpsetUpgradePass(target=23)(model).modified
    assert model.graph.initializers["W"].const_value is weight
    assert weight._array is None and weight.raw is None
    ir.save(model, tmp_path / "up.onnx", external_data="up.data")
    assert_equivalent(str(tmp_path / "m.onnx"), str(tmp_path / "up.onnx"), examples=5, rtol=1e-4, atol=1e-4)


def test_opset_at_least_prerequisite():
    requirement = opset_at_least(23)
    assert requirement.description == "default-domain opset >= 23"
    assert requirement.satisfied_by == "opset-upgrade"
    assert dict(requirement.options) == {"target": 23}
    model = parse(REDUCE_MEAN_17)
    assert not requirement.check(model)
    OpsetUpgradePass(**requirement.options)(model)
    assert requirement.check(model)
    model.opset_imports[""] = 25
    assert requirement.check(model)

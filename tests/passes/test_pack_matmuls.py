"""pack-matmuls: sibling MatMuls of one input by constant weights become one MatMul and a Split, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import feeds_for, session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from qgraph_passes.pack_matmuls import RULES

import qgraph
from qgraph import io as qio
from qgraph.verify.rule_check import check_rule

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def projections(draw) -> dict:
    k = draw(st.sampled_from([4, 8]))
    return {
        "k": k,
        "widths": draw(st.lists(st.sampled_from([2, 4, 6]), min_size=2, max_size=3)),
        "rank": draw(st.sampled_from([2, 3])),
        "input_weight": draw(st.booleans()),  # one more sibling whose weight is a graph input: never packed
    }


def build(case: dict) -> onnx.ModelProto:
    k, rng = case["k"], np.random.default_rng(0)
    x_dims = ["B", "S", k] if case["rank"] == 3 else ["T", k]
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)]
    outputs = []
    for i, n in enumerate(case["widths"]):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [*x_dims[:-1], n]))
    if case["input_weight"]:
        inputs.append(helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [k, 3]))
        nodes.append(helper.make_node("MatMul", ["x", "w_in"], ["y_in"]))
        outputs.append(helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [*x_dims[:-1], 3]))
    graph = helper.make_graph(nodes, "siblings", inputs, outputs, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@SETTINGS
@given(case=projections(), data=st.data())
def test_siblings_pack_into_one_matmul_and_the_outputs_are_bit_identical(case, data, tmp_path_factory):
    proto = build(case)
    packed, report = qgraph.optimize_with_report(ir.from_proto(proto), ["pack-matmuls"])
    ops = [n.op_type for n in packed.graph]
    expected_matmuls = 1 + (1 if case["input_weight"] else 0)
    assert ops.count("MatMul") == expected_matmuls and ops.count("Split") == 1, ops
    rule = "pack-three-matmuls" if len(case["widths"]) == 3 else "pack-two-matmuls"
    assert report.passes[-1].rule_matches == {rule: 1}
    # the packed weight is lazy: saving writes the concatenation
    path = tmp_path_factory.mktemp("packed") / "model.onnx"
    qio.save(packed, path)
    before, after = session(proto), session(str(path))
    for _ in range(3):
        feeds = data.draw(feeds_for(proto))
        for expected, actual in zip(before.run(None, feeds), after.run(None, feeds)):
            np.testing.assert_array_equal(actual, expected)


def build_parallel(k: int, widths: list[int]) -> onnx.ModelProto:
    """GPT-J's parallel block as optimum exports it: Q, K and V of x read early, the MLP's fc_in of the same x
    only after the attention that reads them."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}")
             for i, n in enumerate(widths)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(3)]
    nodes.append(helper.make_node("Concat", ["y0", "y1", "y2"], ["attention"], axis=-1))
    nodes.append(helper.make_node("MatMul", ["x", "w3"], ["y3"]))
    outputs = [helper.make_tensor_value_info("attention", TensorProto.FLOAT, ["B", "S", sum(widths[:3])]),
               helper.make_tensor_value_info("y3", TensorProto.FLOAT, ["B", "S", widths[3]])]
    graph = helper.make_graph(nodes, "parallel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                              outputs, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@SETTINGS
@given(k=st.sampled_from([4, 8]), widths=st.lists(st.sampled_from([2, 4, 6]), min_size=4, max_size=4), data=st.data())
def test_a_packed_projection_packed_again_with_a_later_sibling_stays_in_order(k, widths, data, tmp_path_factory):
    """Q/K/V packed first, then that packed MatMul packed with fc_in further down in the same sweep: one MatMul,
    the two Splits before the attention that reads them (the pass manager's invariant check would reject a
    graph out of topological order), and the outputs bit-identical."""
    proto = build_parallel(k, widths)
    packed, report = qgraph.optimize_with_report(ir.from_proto(proto), ["pack-matmuls"])
    ops = [n.op_type for n in packed.graph]
    assert ops.count("MatMul") == 1 and ops.count("Split") == 2, ops
    assert report.passes[-1].rule_matches == {"pack-three-matmuls": 1, "pack-two-matmuls": 1}
    seen: set[ir.Value] = set(packed.graph.inputs) | set(packed.graph.initializers.values())
    for node in packed.graph:  # every operand made before it is read
        assert all(v is None or v in seen or v.const_value is not None for v in node.inputs), node.name
        seen.update(node.outputs)
    path = tmp_path_factory.mktemp("parallel") / "model.onnx"
    qio.save(packed, path)
    before, after = session(proto), session(str(path))
    feeds = data.draw(feeds_for(proto))
    for expected, actual in zip(before.run(None, feeds), after.run(None, feeds)):
        np.testing.assert_array_equal(actual, expected)


def test_weights_of_different_dtypes_are_not_packed():
    proto = build({"k": 4, "widths": [2, 2], "rank": 2, "input_weight": False})
    model = ir.from_proto(proto)
    w1 = model.graph.initializers["w1"]
    w1.const_value = ir.tensor(w1.const_value.numpy().astype(np.float16))
    w1.dtype = ir.DataType.FLOAT16
    _, report = qgraph.optimize_with_report(model, ["pack-matmuls"])
    assert report.passes[-1].rule_matches == {}
    assert any("not one dtype" in n for n in report.passes[-1].notes), report.passes[-1].notes


@pytest.mark.parametrize("rule", RULES.rules, ids=lambda r: r.name)
def test_each_rule_holds_on_its_own(rule):
    result = check_rule(rule, examples=2)
    assert result.ok, str(result)


_PACKED_DTYPES = [np.float32, np.float16, np.int8, np.int64, "bfloat16"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(_PACKED_DTYPES), rows=st.integers(1, 9),
       cols=st.lists(st.integers(1, 5), min_size=2, max_size=3), block=st.integers(1, 200), data=st.data())
def test_a_packed_weight_is_written_block_by_block_as_its_bytes(tmp_path_factory, monkeypatch, dtype, rows, cols,
                                                                block, data):
    # monkeypatch only sets the block size, the same kind of value for every example
    import ml_dtypes

    from qgraph_passes import pack_matmuls

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    parts = [ir.tensor(data.draw(st.lists(st.integers(-100, 100), min_size=rows * c, max_size=rows * c))
                       ).numpy().astype(np_dtype).reshape(rows, c) for c in cols]
    monkeypatch.setattr(pack_matmuls, "_BLOCK_BYTES", block)  # several blocks, and a last short one
    packed = pack_matmuls.PackedColumns([ir.tensor(p) for p in parts])
    path = tmp_path_factory.mktemp("packed") / "w.bin"
    with open(path, "wb") as f:
        packed.tofile(f)
    assert path.read_bytes() == packed.tobytes() == np.concatenate(parts, axis=1).tobytes()


def test_a_packed_sub_byte_weight_is_written_as_onnx_packs_it(tmp_path):
    from qgraph_passes.pack_matmuls import PackedColumns

    parts = [ir.Tensor(np.array([[1, 2], [3, 4]], np.int8), dtype=ir.DataType.INT4),
             ir.Tensor(np.array([[5, 6], [7, -1]], np.int8), dtype=ir.DataType.INT4)]
    packed = PackedColumns(parts)
    with open(tmp_path / "w.bin", "wb") as f:
        packed.tofile(f)
    assert (tmp_path / "w.bin").read_bytes() == packed.tobytes()
    assert len(packed.tobytes()) == 4  # 8 four-bit values

"""cse keeps a graph output's declared type when it merges it into an untyped duplicate (found by the fuzz suite)."""

from __future__ import annotations

import io

import onnx
from onnx import TensorProto, helper

from qgraph.cli import main


def test_a_graph_output_merged_into_an_untyped_duplicate_keeps_its_type(tmp_path, capsys):
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["first"]),  # untyped intermediate
            helper.make_node("Neg", ["first"], ["used"]),
            helper.make_node("Relu", ["x"], ["y"]),  # the same computation, declared as an output
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("used", TensorProto.FLOAT, ["batch", 3])],
    )
    source = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "cse"], out=io.StringIO())
    assert code == 0, capsys.readouterr().err
    result = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in result.graph.node].count("Relu") == 1
    (y,) = [o for o in result.graph.output if o.name == "y"]
    assert y.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim] == ["batch", 3]

"""qgraph.optimize gives back the kind of model it was given."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest
from framework_passes import relu_neg_model

import qgraph

PIPELINE = ["identity-elimination", "dce"]


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_model_proto_in_model_proto_out_and_input_untouched():
    proto = relu_neg_model(17)
    before = proto.SerializeToString()
    result = qgraph.optimize(proto, PIPELINE)
    assert isinstance(result, onnx.ModelProto)
    assert op_types(result) == ["Neg", "Neg", "Relu"]
    assert proto.SerializeToString() == before


def test_bytes_in_bytes_out():
    result = qgraph.optimize(relu_neg_model(17).SerializeToString(), PIPELINE)
    assert isinstance(result, bytes)
    assert op_types(onnx.load_from_string(result)) == ["Neg", "Neg", "Relu"]


def test_ir_model_is_rewritten_in_place():
    model = ir.from_proto(relu_neg_model(17))
    assert qgraph.optimize(model, PIPELINE) is model
    assert [n.op_type for n in model.graph] == ["Neg", "Neg", "Relu"]


def test_graphsurgeon_graph_in_graph_out():
    graph = gs.import_onnx(relu_neg_model(17))
    result = qgraph.optimize(graph, PIPELINE)
    assert isinstance(result, gs.Graph)
    assert [n.op for n in result.nodes] == ["Neg", "Neg", "Relu"]
    assert [t.name for t in result.outputs] == ["y"]


def test_path_in_path_out_and_output_required(tmp_path):
    source = tmp_path / "in.onnx"
    relu_neg_model(17, source)
    result = qgraph.optimize(source, PIPELINE, output=tmp_path / "out.onnx")
    assert result == (tmp_path / "out.onnx").resolve()
    assert op_types(onnx.load(result)) == ["Neg", "Neg", "Relu"]
    with pytest.raises(ValueError, match="output="):
        qgraph.optimize(source, PIPELINE)

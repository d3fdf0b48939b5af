"""Malformed and structurally invalid models: the offending value or node named, exit 2 (issue 18: 7)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qgraph.io as qio
from qgraph.cli import main
from qgraph.errors import BadInputError


def chain(nodes, *, opset: int = 17, initializers=(), ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def cli_exit(tmp_path, proto: onnx.ModelProto, capsys, *argv: str) -> tuple[int, str]:
    path = tmp_path / "in.onnx"
    path.write_bytes(proto.SerializeToString())
    command = argv or ("optimize", str(path), "-o", str(tmp_path / "out.onnx"))
    code = main([a.replace("IN", str(path)) for a in command], out=io.StringIO())
    return code, capsys.readouterr().err


def test_a_value_produced_by_two_nodes_is_named(tmp_path, capsys):
    proto = chain([
        helper.make_node("Relu", ["x"], ["t"], name="first"),
        helper.make_node("Neg", ["x"], ["t"], name="second"),
        helper.make_node("Identity", ["t"], ["y"], name="last"),
    ])
    with pytest.raises(BadInputError, match=r"'t'.*'first'.*'second'"):
        qio.load(proto)
    code, err = cli_exit(tmp_path, proto, capsys)
    assert code == 2 and "_deserialize_graph" not in err and "'t'" in err


def test_a_node_writing_over_a_graph_input_is_named():
    proto = chain([helper.make_node("Relu", ["x"], ["x"], name="loop"), helper.make_node("Identity", ["x"], ["y"])])
    with pytest.raises(BadInputError, match=r"'loop'.*'x'.*graph input"):
        qio.load(proto)


def test_a_cycle_is_bad_input_naming_its_nodes(tmp_path, capsys):
    proto = chain([
        helper.make_node("Add", ["x", "c"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Neg", ["b"], ["c"], name="neg"),
        helper.make_node("Identity", ["a"], ["y"], name="out"),
    ])
    with pytest.raises(BadInputError, match=r"cycle.*'add'.*'relu'.*'neg'"):
        qio.load(proto)
    code, err = cli_exit(tmp_path, proto, capsys)
    assert code == 2 and "topological-sort" not in err and "'relu'" in err


def test_nodes_out_of_order_but_acyclic_still_load():
    proto = chain([helper.make_node("Identity", ["t"], ["y"]), helper.make_node("Relu", ["x"], ["t"])])
    assert [n.op_type for n in qio.load(proto).graph] == ["Identity", "Relu"]


@pytest.mark.parametrize("corruption", ["short-raw-data", "wrong-count"])
def test_a_corrupt_initializer_is_bad_input_naming_it(tmp_path, capsys, corruption):
    w = onnx.numpy_helper.from_array(np.ones([2], np.float32), "w")
    if corruption == "short-raw-data":
        w.raw_data = w.raw_data[:5]
    else:
        w.ClearField("raw_data")
        w.float_data.extend([1.0, 2.0, 3.0])
    proto = chain([helper.make_node("Mul", ["x", "w"], ["y"])], initializers=[w])
    with pytest.raises(BadInputError, match=r"initializer 'w'.*\[2\]"):
        qio.load(proto)
    code, err = cli_exit(tmp_path, proto, capsys)
    assert code == 2 and "'w'" in err


@pytest.mark.parametrize(
    ("proto", "message"),
    [
        (chain([helper.make_node("Relu", ["x"], ["y"])], opset=99), r"opset 99.*onnx .* knows up to"),
        (chain([helper.make_node("Relu", ["x"], ["y"])], ir_version=99), r"IR version 99"),
        (chain([helper.make_node("Frobnicate", ["x"], ["y"], name="mystery")]), r"'mystery' \(Frobnicate\).*no such op"),
        (chain([helper.make_node("Gelu", ["x"], ["y"], name="early")], opset=17), r"'early' \(Gelu\).*opset 17"),
    ],
    ids=["opset-99", "ir-99", "unknown-op", "op-newer-than-opset"],
)
def test_structurally_invalid_models_are_bad_input(tmp_path, capsys, proto, message):
    with pytest.raises(BadInputError, match=message):
        qio.load(proto)
    code, _ = cli_exit(tmp_path, proto, capsys, "inspect", "IN")
    assert code == 2


def test_warnings_print_one_line_without_source_code(tmp_path, capsys):
    proto = chain([helper.make_node("Mystery", ["x"], ["y"], domain="com.example")])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    with warnings.catch_warnings():
        code, err = cli_exit(tmp_path, proto, capsys, "inspect", "IN")
    assert code == 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qgraph inspect: warning: ")
    assert "com.example::Mystery" in lines[0] and ".py:" not in err

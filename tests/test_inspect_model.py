"""Tests of qgraph.inspect_model: the summary dict and its text form."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import onnx
import pytest
from model_builders import (
    CUSTOM_DOMAIN,
    mlp_model,
    model_with_external_data,
    model_with_function,
    model_with_subgraph,
)
from onnx import TensorProto, helper

from qgraph import io as qio
from qgraph.graph_stats import all_nodes, count_nodes, iter_nodes, op_histogram, op_key
from qgraph.inspect_model import format_summary, summarize


def test_mlp_summary() -> None:
    summary = summarize(qio.load(mlp_model()))
    assert summary["graph_name"] == "mlp"
    assert summary["opset_imports"] == {"ai.onnx": 17}
    assert summary["inputs"] == [{"name": "x", "dtype": "FLOAT", "shape": ["batch", 4]}]
    assert summary["outputs"] == [{"name": "y", "dtype": "FLOAT", "shape": ["batch", 3]}]
    assert summary["nodes"] == 5 and summary["subgraph_nodes"] == 0
    # sorted by count, then name
    assert list(summary["op_histogram"].items()) == [("Add", 2), ("MatMul", 2), ("Relu", 1)]
    params = 4 * 8 + 8 + 8 * 3 + 3
    assert summary["initializers"] == {
        "count": 4,
        "parameters": params,
        "bytes": 4 * params,
        "external": {"count": 0, "bytes": 0, "files": []},
    }
    assert summary["functions"] == []


def test_summary_is_json_serialisable() -> None:
    for proto in (mlp_model(), model_with_function(), model_with_subgraph()):
        summary = summarize(qio.load(proto))
        assert json.loads(json.dumps(summary)) == summary


def test_function_calls_count_once_and_bodies_are_reported_separately() -> None:
    summary = summarize(qio.load(model_with_function()))
    assert summary["opset_imports"] == {"ai.onnx": 17, CUSTOM_DOMAIN: 1}
    assert summary["nodes"] == 1
    assert summary["op_histogram"] == {f"{CUSTOM_DOMAIN}::ScaledAdd": 1}
    assert summary["functions"] == [
        {
            "name": f"{CUSTOM_DOMAIN}::ScaledAdd",
            "inputs": 2,
            "outputs": 1,
            "nodes": 3,
            "op_histogram": {"Add": 1, "Constant": 1, "Mul": 1},
        }
    ]


def test_subgraph_nodes_and_initializers_are_counted() -> None:
    summary = summarize(qio.load(model_with_subgraph()))
    assert summary["nodes"] == 3 and summary["subgraph_nodes"] == 2
    assert summary["op_histogram"] == {"Add": 1, "If": 1, "Sub": 1}
    assert summary["initializers"]["count"] == 2
    assert summary["initializers"]["parameters"] == 6


def test_op_keys() -> None:
    assert op_key("", "Add") == "Add"
    assert op_key("ai.onnx", "Add") == "Add"
    assert op_key("com.microsoft", "GroupQueryAttention") == "com.microsoft::GroupQueryAttention"
    assert op_key("pkg.x", "F", "v2") == "pkg.x::F:v2"


def test_histogram_helpers_work_on_graphs_and_functions() -> None:
    model = qio.load(model_with_function())
    function = next(iter(model.functions.values()))
    assert count_nodes(function) == 3
    assert op_histogram(function) == {"Add": 1, "Constant": 1, "Mul": 1}
    assert count_nodes(model.graph) == 1


def test_node_walk_visits_what_onnx_ir_traversal_visits_in_the_same_order() -> None:
    import onnx_ir as ir

    for proto in (mlp_model(), model_with_function(), model_with_subgraph()):
        model = qio.load(proto)
        expected = list(ir.traversal.RecursiveGraphIterator(model.graph))
        for function in model.functions.values():
            expected += list(ir.traversal.RecursiveGraphIterator(function))
        assert list(all_nodes(model)) == expected
        assert list(iter_nodes(model.graph)) == expected[: count_nodes(model.graph)]


def test_unknown_dims_rank_and_other_dtypes() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"]), helper.make_node("Cast", ["a"], ["c"], to=TensorProto.FLOAT)],
        "dims",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT16, ["n", None, 7])],
        [
            helper.make_tensor_value_info("b", TensorProto.FLOAT16, None),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", None, 7]),
        ],
    )
    summary = summarize(qio.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert summary["inputs"] == [{"name": "a", "dtype": "FLOAT16", "shape": ["n", None, 7]}]
    assert summary["outputs"][0] == {"name": "b", "dtype": "FLOAT16", "shape": None}
    text = format_summary(summary)
    assert "[n, ?, 7]" in text


def test_summary_reads_no_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = model_with_external_data(tmp_path)
    data_file = os.path.realpath(tmp_path / "model.onnx.data")
    model = qio.load(path)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == data_file:
            raise AssertionError("summarize read the external data")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    summary = summarize(model)
    assert summary["initializers"]["external"] == {
        "count": 4,
        "bytes": summary["initializers"]["bytes"],
        "files": ["model.onnx.data"],
    }
    assert all(v.const_value.raw is None for v in model.graph.initializers.values())


def test_format_summary_shows_the_essentials(tmp_path: Path) -> None:
    text = format_summary(summarize(qio.load(model_with_external_data(tmp_path))))
    lines = text.splitlines()
    assert lines[0].startswith("Model: graph 'mlp'")
    assert "Opsets: ai.onnx 17" in lines
    assert any(line.split() == ["x", "FLOAT", "[batch,", "4]"] for line in lines)
    assert any(line.split() == ["y", "FLOAT", "[batch,", "3]"] for line in lines)
    assert "Nodes: 5" in lines
    assert any(line.split() == ["MatMul", "2"] for line in lines)
    assert any(line.startswith("Initializers: 4, parameters 67, 268 B") for line in lines)
    assert any("external data: 4 tensors" in line and "model.onnx.data" in line for line in lines)


def test_format_summary_of_a_large_model_with_functions() -> None:
    summary = summarize(qio.load(model_with_function()))
    summary["initializers"].update(parameters=135_000_000, bytes=540_000_000)
    text = format_summary(summary)
    assert "parameters 135,000,000, 515.0 MiB" in text
    assert "Functions (1):" in text
    function_row = next(line for line in text.splitlines() if line.strip().startswith(f"{CUSTOM_DOMAIN}::ScaledAdd") and line.split()[-1] == "3")
    assert function_row.split() == [f"{CUSTOM_DOMAIN}::ScaledAdd", "2", "1", "3"]


def test_columns_line_up() -> None:
    text = format_summary(summarize(qio.load(mlp_model())))
    lines = text.splitlines()
    start = lines.index("Nodes: 5") + 1
    table = lines[start : start + 4]  # header + 3 ops
    assert table[0].split() == ["op", "count"]
    # counts are right-aligned under the header's right edge
    assert len({len(line) for line in table}) == 1


def test_onnx_checker_agrees_models_are_valid() -> None:
    # guards the builders themselves: a summary of an invalid model proves little
    for proto in (mlp_model(), model_with_function(), model_with_subgraph()):
        onnx.checker.check_model(proto, full_check=True)

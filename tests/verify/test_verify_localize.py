"""The localizer: first diverging shared tensor, in topological order, by chunked scan."""

from __future__ import annotations

import mutants
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as oh

from qgraph.verify import localize, shared_tensors


def reconverging(factor: float) -> onnx.ModelProto:
    """t1 = x*c diverges when c changes; relu(-|t1|) is 0 either way (re-converges);
    the output adds t1 back, so it diverges again. Nodes are listed out of order
    on purpose: the localizer must use the topological order, not the file order."""
    nodes = [
        oh.make_node("Add", ["t3", "t1"], ["y"], name="out"),
        oh.make_node("Mul", ["x", "c"], ["t1"], name="scale"),
        oh.make_node("Abs", ["t1"], ["abs"], name="abs"),
        oh.make_node("Neg", ["abs"], ["neg"], name="neg"),
        oh.make_node("Relu", ["neg"], ["zero"], name="relu"),
        oh.make_node("Add", ["zero", "x"], ["t3"], name="add_x"),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", T.FLOAT, [2, 3])],
        [oh.make_tensor_value_info("y", T.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(np.array(factor, np.float32), "c")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def test_shared_tensors_follow_the_candidate_topological_order() -> None:
    names = shared_tensors(ir.from_proto(reconverging(1.0)), ir.from_proto(reconverging(2.0)))
    assert names == ["t1", "abs", "neg", "zero", "t3", "y"]


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_the_earliest_divergence_is_found_even_when_later_tensors_reconverge(chunk_size: int) -> None:
    reference, candidate = ir.from_proto(reconverging(1.0)), ir.from_proto(reconverging(2.0))
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2}
    divergence = localize(reference, candidate, feeds, feeds, chunk_size=chunk_size)
    assert divergence is not None
    assert divergence.tensor == "t1"
    assert divergence.candidate_node.name == "scale"
    assert divergence.position == 0
    assert divergence.runs == 1  # found in the first chunk, so no further runs


def test_chunks_are_scanned_until_the_divergence() -> None:
    reference = ir.from_proto(mutants.rms_norm())
    candidate = ir.from_proto(mutants.rms_norm(epsilon=1e-3))
    feeds = {"x": np.random.default_rng(0).normal(size=(1, 2, mutants.HIDDEN)).astype(np.float32)}
    names = shared_tensors(reference, candidate)
    at = names.index("rms/mean_eps")
    divergence = localize(reference, candidate, feeds, feeds, chunk_size=1)
    assert divergence.tensor == "rms/mean_eps"
    assert divergence.runs == at + 1
    assert localize(reference, candidate, feeds, feeds).runs == 1


def test_equal_graphs_have_no_divergence() -> None:
    model = ir.from_proto(mutants.masked_attention())
    feeds = {
        "x": np.ones((1, 3, 4), np.float32),
        "attention_mask": np.array([[1, 1, 0]]),
        "position_ids": np.array([[0, 1, 1]]),
    }
    assert localize(model, model, feeds, feeds) is None


def test_tensors_of_another_dtype_under_the_same_name_are_not_compared() -> None:
    reference = ir.from_proto(reconverging(1.0))
    candidate = ir.from_proto(reconverging(2.0))
    assert "t1" in shared_tensors(reference, candidate)  # unknown dtypes: compared at run time
    for model, dtype in ((reference, ir.DataType.FLOAT), (candidate, ir.DataType.DOUBLE)):
        model.graph.node("scale").outputs[0].dtype = dtype
    assert "t1" not in shared_tensors(reference, candidate)


def test_a_small_tensor_is_judged_against_its_own_range() -> None:
    # The eps change moves mean(x^2) ~ 1e-2 by 9e-6: under an absolute 1e-4,
    # yet far beyond rounding. The blame must stay on the Add, not move down.
    reference = ir.from_proto(mutants.rms_norm())
    candidate = ir.from_proto(mutants.rms_norm(epsilon=1e-5))
    feeds = {"x": np.full((1, 1, mutants.HIDDEN), 0.1, np.float32)}
    divergence = localize(reference, candidate, feeds, feeds)
    assert divergence.candidate_node.name == "rms/add_eps"

"""Weights on disk are mapped once and shared by every verification session that reads the same bytes.

The memory saving is measured in benchmarks/ (inline_memory.py); here the
properties that make it safe: sessions that share weights compute what an
ordinary onnxruntime session computes, weights are shared only when their
bytes are the same (a model whose weight differs is still found to differ),
and a mapped weight goes when the last session reading it does.
"""

from __future__ import annotations

import gc

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph import io as qio
from qgraph.verify import check_equivalent
from qgraph.verify import shared_weights
from qgraph.verify.runner import OrtRunner, _session_options

SIDE = 128  # 64 KiB of float32: the smallest weight that is shared


def _linear(weight: np.ndarray) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", SIDE]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([SIDE, SIDE]),
                 const_value=ir.Tensor(weight, name="w"))
    node = ir.node("MatMul", [x, w], name="mm")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def _saved(tmp_path, name: str, weight: np.ndarray, external: bool = True):
    folder = tmp_path / name
    folder.mkdir()
    return qio.save(_linear(weight), folder / "model.onnx", external_data=external)


def _weight(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((SIDE, SIDE)).astype(np.float32)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 4))
def test_sessions_sharing_a_weight_compute_what_a_plain_session_does(tmp_path_factory, seed, batch):
    path = _saved(tmp_path_factory.mktemp("m"), "a", _weight(seed))
    model = qio.load(path)
    x = np.random.default_rng(seed + 1).standard_normal((batch, SIDE)).astype(np.float32)
    with OrtRunner(model) as first, OrtRunner(qio.load(path)) as second:
        assert first._shared and first._shared[0] is second._shared[0]  # one mapping for both
        got = first.run({"x": x})["y"], second.run({"x": x})["y"]
    # The same session options, the weights read by onnxruntime itself (prepacked as usual).
    plain = ort.InferenceSession(str(path), _session_options(1), providers=["CPUExecutionProvider"])
    plain = plain.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got[0], plain)
    np.testing.assert_array_equal(got[1], plain)


def test_two_files_holding_the_same_weight_share_it_and_a_different_weight_is_not_shared(tmp_path):
    a = _saved(tmp_path, "a", _weight(1))
    same = _saved(tmp_path, "same", _weight(1))
    other = _saved(tmp_path, "other", _weight(2))
    with OrtRunner(qio.load(a)) as ra, OrtRunner(qio.load(same)) as rs, OrtRunner(qio.load(other)) as ro:
        assert rs._shared[0] is ra._shared[0]
        assert ro._shared[0] is not ra._shared[0]


def test_a_model_whose_weight_differs_in_one_element_is_still_found_to_differ(tmp_path):
    """Sharing by content must never make two different weights one: the check would then pass a wrong model."""
    weight = _weight(3)
    changed = weight.copy()
    changed[SIDE - 1, SIDE - 1] += 1.0
    a, b = _saved(tmp_path, "a", weight), _saved(tmp_path, "b", changed)
    assert not check_equivalent(str(a), str(b), examples=5, artifacts_dir=tmp_path / "kept").equivalent
    assert check_equivalent(str(a), str(_saved(tmp_path, "c", weight)), examples=5,
                            artifacts_dir=tmp_path / "kept2").equivalent


def test_a_mapped_weight_goes_with_the_last_session_that_reads_it(tmp_path):
    path = _saved(tmp_path, "a", _weight(4))
    runner = OrtRunner(qio.load(path))
    assert len(shared_weights._BY_LOCATION) >= 1
    key = next(k for k in shared_weights._BY_LOCATION if k[0] == str(path.with_name("model.onnx.data").resolve()))
    runner.close()
    del runner
    gc.collect()
    assert key not in shared_weights._BY_LOCATION


def test_small_weights_are_left_to_onnxruntime(tmp_path):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", 4]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 4]),
                 const_value=ir.Tensor(np.eye(4, dtype=np.float32), name="w"))
    node = ir.node("MatMul", [x, w], name="mm")
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 18}),
                     ir_version=10)
    with OrtRunner(model) as runner:
        assert runner._shared == []

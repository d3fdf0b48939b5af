"""Inline weights are mapped from the model file and streamed into the output (issue 18: 9).

The memory figures are in benchmarks/inline_memory.py; these tests prove
the files and values are exactly what onnx reads and writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import qgraph.io as qio

DTYPES = [np.float32, np.float16, np.int64, np.int8, np.float64]


def _model(arrays: list[np.ndarray]) -> onnx.ModelProto:
    inits = [onnx.numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(arrays)]
    outputs = [helper.make_tensor_value_info(f"y{i}", helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
               for i, a in enumerate(arrays)]
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"y{i}"]) for i in range(len(arrays))]
    graph = helper.make_graph(nodes, "g", [], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="note", value="kept")
    return model


arrays = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.integers(0, 3000), st.integers(0, 2**31)).map(
        lambda t: np.random.default_rng(t[2]).integers(-100, 100, size=t[1]).astype(t[0])
    ),
    min_size=1, max_size=5,
)


def _saved(tmp_path_factory, arrays: list[np.ndarray]) -> Path:
    path = tmp_path_factory.mktemp("inline") / "m.onnx"
    onnx.save(_model(arrays), path)
    return path


@given(arrays=arrays)
@settings(max_examples=25, deadline=None)
def test_inline_weights_load_as_references_with_the_same_values(tmp_path_factory, arrays):
    model = qio.load(_saved(tmp_path_factory, arrays))
    for i, expected in enumerate(arrays):
        tensor = model.graph.initializers[f"w{i}"].const_value
        large = expected.nbytes > qio.EXTERNAL_TENSOR_THRESHOLD_BYTES
        assert isinstance(tensor, ir.ExternalTensor) == large  # mapped from the file, not read into memory
        np.testing.assert_array_equal(tensor.numpy(), expected)
    assert model.metadata_props["note"] == "kept"


@given(arrays=arrays)
@settings(max_examples=25, deadline=None)
def test_a_streamed_save_is_the_model_onnx_would_write(tmp_path_factory, arrays):
    source = _saved(tmp_path_factory, arrays)
    out = source.with_name("out.onnx")
    qio.save(qio.load(source), out, external_data=False)
    written = onnx.load(out)
    onnx.checker.check_model(written)
    expected = onnx.load(source)
    assert [t.name for t in written.graph.initializer] == [t.name for t in expected.graph.initializer]
    for got, want in zip(written.graph.initializer, expected.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(got), onnx.numpy_helper.to_array(want))
        assert not got.external_data and got.data_location == TensorProto.DEFAULT
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in expected.graph.node]


def _big() -> list[np.ndarray]:
    return [np.arange(4096, dtype=np.float32)]


def test_a_hard_linked_or_symlinked_model_is_read_in_full(tmp_path):
    source = tmp_path / "real" / "m.onnx"
    source.parent.mkdir()
    onnx.save(_model(_big()), source)
    os.link(source, tmp_path / "linked.onnx")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "m.onnx").symlink_to(source)
    for path in (tmp_path / "linked.onnx", tmp_path / "elsewhere" / "m.onnx"):
        tensor = qio.load(path).graph.initializers["w0"].const_value
        assert not isinstance(tensor, ir.ExternalTensor)
        np.testing.assert_array_equal(tensor.numpy(), _big()[0])


def test_resaving_inline_over_the_source_is_still_refused(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(_model(_big()), source)
    model = qio.load(source)
    import pytest

    with pytest.raises(qio.BadInputError):
        qio.save(model, tmp_path / "." / "m.onnx")
    assert Path(source).stat().st_size > 0
    np.testing.assert_array_equal(qio.load(source).graph.initializers["w0"].const_value.numpy(), _big()[0])


def test_a_truncated_inline_file_is_still_bad_input(tmp_path):
    import pytest

    source = tmp_path / "m.onnx"
    onnx.save(_model(_big()), source)
    data = source.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 40):
        source.write_bytes(data[:cut])
        with pytest.raises(qio.BadInputError):
            qio.load(source)

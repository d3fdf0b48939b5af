"""qgraph.node_types: a Constant is typed from its attribute exactly as onnx's inference types it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.node_types import _infer_with_onnx, infer_output_types

_DTYPES = [np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_, np.float64]

_ATTRIBUTES = st.one_of(
    st.tuples(st.just("value_int"), st.integers(-2**40, 2**40)),
    st.tuples(st.just("value_ints"), st.lists(st.integers(-9, 9), max_size=5)),
    st.tuples(st.just("value_float"), st.floats(-1e3, 1e3, width=32)),
    st.tuples(st.just("value_floats"), st.lists(st.floats(-1e3, 1e3, width=32), max_size=5)),
    st.tuples(st.just("value_string"), st.text(max_size=4)),
    st.tuples(st.just("value_strings"), st.lists(st.text(max_size=3), max_size=3)),
    st.tuples(st.just("value"), st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 3), max_size=3))),
)


def _constant(name: str, raw) -> ir.Node:
    if name == "value":
        dtype, dims = raw
        attr = ir.AttrTensor("value", ir.tensor(np.zeros(dims, dtype)))
    else:
        kind = {"value_int": ir.AttrInt64, "value_ints": ir.AttrInt64s, "value_float": ir.AttrFloat32,
                "value_floats": ir.AttrFloat32s, "value_string": ir.AttrString,
                "value_strings": ir.AttrStrings}[name]
        attr = kind(name, raw)
    return ir.Node("", "Constant", [], attributes=[attr], num_outputs=1)


@settings(max_examples=150, deadline=None)
@given(_ATTRIBUTES)
def test_a_constant_gets_the_type_onnx_infers_for_it(attribute) -> None:
    fast, slow = _constant(*attribute), _constant(*attribute)
    assert infer_output_types(fast, {"": 23})
    assert _infer_with_onnx(slow, "", {"": 23})
    (a,), (b,) = fast.outputs, slow.outputs
    assert (a.dtype, a.shape) == (b.dtype, b.shape)


def test_a_typed_constant_output_is_left_as_it_is() -> None:
    node = _constant("value_ints", [1, 2, 3])
    node.outputs[0].shape = ir.Shape(["n"])
    assert infer_output_types(node, {"": 23})
    assert node.outputs[0].shape == ir.Shape(["n"]) and node.outputs[0].dtype == ir.DataType.INT64

"""static_dim / static_value: a head size written in a TorchScript heads reshape is read back as a number."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qgraph_passes.shape_values import static_dim, static_value

# TorchScript's q.view(b, s, -1, d).transpose(1, 2)[..., :r], then r // 2 computed from the slice's shape:
# the stored shapes are left symbolic (no data propagation), as in the exports.
TEXT = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[B, S, {hidden}] q) => (float[b1, h1, s1, r1] x, int64[1] half) {{
    shape = Shape(q)
    zero = Constant <value_int = 0> ()
    one = Constant <value_int = 1> ()
    ax0 = Constant <value_ints = [0]> ()
    b = Gather <axis = 0> (shape, zero)
    s = Gather <axis = 0> (shape, one)
    bu = Unsqueeze(b, ax0)
    su = Unsqueeze(s, ax0)
    minus = Constant <value_ints = [-1]> ()
    d = Constant <value_ints = [{d}]> ()
    heads_shape = Concat <axis = 0> (bu, su, minus, d)
    heads = Reshape(q, heads_shape)
    t = Transpose <perm = [0, 2, 1, 3]> (heads)
    start = Constant <value_ints = [0]> ()
    end = Constant <value_ints = [{r}]> ()
    axis = Constant <value_ints = [3]> ()
    x = Slice(t, start, end, axis)
    xs = Shape(x)
    three = Constant <value_int = 3> ()
    two = Constant <value_int = 2> ()
    last = Gather <axis = 0> (xs, three)
    h = Div(last, two)
    half = Unsqueeze(h, ax0)
}}
"""


def _values(heads: int, d: int, r: int) -> dict[str, ir.Value]:
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(TEXT.format(hidden=heads * d, d=d, r=r)))
    model = ir.from_proto(proto)
    for value in (v for n in model.graph for v in n.outputs):  # what the TorchScript export stores: all symbolic
        if value.name in ("heads", "t", "x"):
            value.shape = ir.Shape([f"{value.name}_{i}" for i in range(4)])
    return {v.name: v for n in model.graph for v in n.outputs}


@settings(max_examples=15, deadline=None, derandomize=True)
@given(heads=st.integers(1, 4), d=st.sampled_from([4, 8, 16, 32]), data=st.data())
def test_the_head_size_of_a_reshape_slice_and_transpose_is_read_back(heads, d, data):
    r = data.draw(st.integers(1, d))
    values = _values(heads, d, r)
    assert static_dim(values["heads"], 3) == d and static_dim(values["heads"], -1) == d
    assert static_dim(values["t"], 3) == d
    assert static_dim(values["x"], 3) == r
    assert static_dim(values["heads"], 2) is None  # the -1 entry: the head count is not written there
    assert static_dim(values["x"], 0) is None  # the batch is symbolic
    assert static_value(values["half"]).tolist() == [r // 2]


@pytest.mark.parametrize("allowzero, expected", [(0, 8), (1, 0)])
def test_a_zero_entry_copies_the_input_dim_only_without_allowzero(allowzero, expected):
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[2, 8] x) => (float[a, b] y) {{
        shape = Constant <value_ints = [2, 0]> ()
        y = Reshape <allowzero = {allowzero}> (x, shape)
    }}
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    y = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    y.shape = ir.Shape(["a", "b"])
    assert static_dim(y, 1) == expected

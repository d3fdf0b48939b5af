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


# Falcon's fused projection split into q, k, v on the heads axis; GPT-NeoX's cos table, whose width is the
# concatenation of two frequency products broadcast from positions [B, S, 1] and frequencies [F]; its
# rotary part sliced to the table's width. Every stored shape is erased to symbols (as TorchScript leaves
# them) and the dims static_dim reads back are checked against the shapes onnxruntime produces.
SPLIT_TEXT = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[B, S, {hidden}] x, float[B, S, 1] pos) => (float[p1, p2, p3, p4] q, float[c1, c2, c3, c4] cos,
                                                     float[r1, r2, r3, r4] rot, float[u1, u2, u3] twice,
                                                     float[k1, k2, k3, k4] k0) {{
    shape = Constant <value_ints = [0, 0, -1, {d}]> ()
    heads = Reshape(x, shape)
    sizes = Constant <value_ints = [{q_heads}, {kv_heads}, {kv_heads}]> ()
    q0, k0, v0 = Split <axis = -2> (heads, sizes)
    q = Transpose <perm = [0, 2, 1, 3]> (q0)
    freqs = Constant <value_floats = {freqs}> ()
    angles = Mul(pos, freqs)
    both = Concat <axis = -1> (angles, angles)
    table = Cos(both)
    ax1 = Constant <value_ints = [1]> ()
    cos = Unsqueeze(table, ax1)
    cos_shape = Shape(cos)
    three = Constant <value_int = 3> ()
    width = Gather <axis = 0> (cos_shape, three)
    ax0 = Constant <value_ints = [0]> ()
    end = Unsqueeze(width, ax0)
    start = Constant <value_ints = [0]> ()
    last = Constant <value_ints = [3]> ()
    rot = Slice(q, start, end, last)
    twice = Mul(pos, both)
}}
"""


@settings(max_examples=12, deadline=None, derandomize=True)
@given(kv_heads=st.integers(1, 3), group=st.integers(1, 3), d=st.sampled_from([8, 16, 32]), data=st.data())
def test_split_unsqueeze_concat_and_broadcast_dims_are_the_ones_onnxruntime_computes(kv_heads, group, d, data):
    import numpy as np
    import onnxruntime as ort

    half = data.draw(st.integers(1, d // 2))
    q_heads = kv_heads * group
    text = SPLIT_TEXT.format(hidden=(q_heads + 2 * kv_heads) * d, d=d, q_heads=q_heads, kv_heads=kv_heads,
                             freqs=[1.0 / (k + 1) for k in range(half)])
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    model = ir.from_proto(proto)
    values = {v.name: v for n in model.graph for v in n.outputs}
    for name, value in values.items():
        if value.shape is not None and len(value.shape) > 1:
            value.shape = ir.Shape([f"{name}_{i}" for i in range(len(value.shape))])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": np.zeros((2, 3, (q_heads + 2 * kv_heads) * d), np.float32), "pos": np.ones((2, 3, 1), np.float32)}
    got = dict(zip(["q", "cos", "rot", "twice", "k0"], session.run(None, feeds)))
    for name, array in got.items():
        for axis, size in enumerate(array.shape):
            read = static_dim(values[name], axis)
            assert read in (None, size), (name, axis, read, size)
    # what the rotary rules need: the head size, the table width and the rotated part, all read back
    assert static_dim(values["q"], 3) == d and static_dim(values["q"], 1) == q_heads
    assert static_dim(values["k0"], 2) == kv_heads
    assert static_dim(values["cos"], 3) == 2 * half and static_dim(values["cos"], 1) == 1
    assert static_dim(values["rot"], 3) == min(2 * half, d)
    assert static_dim(values["twice"], 2) == 2 * half  # [B, S, 1] x [B, S, 2F]: the 1 broadcasts


# SDPA traced without a scale (transformers 4.57's GPT-2 through optimum): 1 / sqrt(E), E read from the query's
# shape at run time, applied as its square root to q and to k.
SCALE_TEXT = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[B, S, {hidden}] x) => (float[1] root, int64[n] dims) {{
    target = Constant <value_ints = [0, 0, {heads}, {d}]> ()
    heads = Reshape(x, target)
    q = Transpose <perm = [0, 2, 1, 3]> (heads)
    shape = Shape(q)
    start = Constant <value_ints = [{start}]> ()
    end = Constant <value_ints = [{end}]> ()
    axis = Constant <value_ints = [0]> ()
    dims = Slice(shape, start, end, axis)
    minus_one = Constant <value_ints = [-1]> ()
    big = Constant <value_ints = [9223372036854775807]> ()
    last = Slice(shape, minus_one, big, axis)
    size = Cast <to = 1> (last)
    sqrt = Sqrt(size)
    one = Constant <value_floats = [1.0]> ()
    scale = Div(one, sqrt)
    root = Sqrt(scale)
}}
"""


@settings(max_examples=20, deadline=None, derandomize=True)
@given(heads=st.integers(1, 4), d=st.sampled_from([8, 16, 64, 80, 96]), start=st.integers(-4, 4),
       end=st.integers(-4, 5))
def test_a_scale_computed_from_the_head_size_is_the_number_onnxruntime_computes(heads, d, start, end):
    """The Slice of a Shape keeps the dims Python's slicing keeps (ONNX clamps alike); a dim that is a number
    makes the slice a number, a symbolic one (batch, sequence) makes it unknown; the float chain on it gives
    onnxruntime's float32 bits."""
    import numpy as np
    import onnxruntime as ort

    kept = list(range(4))[start:end]
    text = SCALE_TEXT.format(hidden=heads * d, heads=heads, d=d, start=start, end=end)
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    model = ir.from_proto(proto)
    values = {v.name: v for n in model.graph for v in n.outputs}
    values["q"].shape = ir.Shape(["b", "h", "s", "e"])  # what a TorchScript export stores: nothing static
    root, dims = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((2, 3, heads * d), np.float32)})
    assert static_value(values["root"]).tobytes() == root.tobytes()
    read = static_value(values["dims"])
    if all(axis in (1, 3) for axis in kept):  # heads and head size: numbers in the graph
        assert read is not None and read.tolist() == dims.tolist()
    else:  # batch or sequence kept: not a constant
        assert read is None


# GPT-J's sin/cos as transformers 4.57 traces them (TorchScript, through optimum): the position table expanded to
# the batch and gathered by position_ids.repeat(1, 1, width); the width reaches the probes only through Expand,
# Tile and GatherElements (the stored shapes are all symbolic).
TABLE_TEXT = """
<ir_version: 10, opset_import: ["" : 23]>
g (int64[B, S] position_ids) => (float[b, s, w] gathered, float[b2, s2, h] sin) {{
    table = Constant <value = float[1, {rows}, {width}] {{ {values} }}> ()
    three = Constant <value_ints = [3]> ()
    ones = ConstantOfShape <value = int64[1] {{1}}> (three)
    wide = Expand(table, ones)
    shape = Shape(position_ids)
    zero = Constant <value_ints = [0]> ()
    one = Constant <value_ints = [1]> ()
    batch = Slice(shape, zero, one)
    tiles = Concat <axis = 0> (batch, one, one)
    tiled = Tile(wide, tiles)
    minus = Constant <value_ints = [-1]> ()
    column = Unsqueeze(position_ids, minus)
    columns = Expand(column, ones)
    table_shape = Shape(tiled)
    two = Constant <value_ints = [2]> ()
    three_end = Constant <value_ints = [3]> ()
    width = Slice(table_shape, two, three_end)
    repeats = Concat <axis = 0> (one, one, width)
    index = Tile(columns, repeats)
    gathered = GatherElements <axis = 1> (tiled, index)
    halves = Constant <value_ints = [{half}, {half}]> ()
    sin, cos = Split <axis = -1> (gathered, halves)
}}
"""


@settings(max_examples=12, deadline=None, derandomize=True)
@given(rows=st.integers(4, 12), half=st.sampled_from([2, 4, 8]), batch=st.integers(1, 3), seq=st.integers(1, 4))
def test_a_table_gathered_by_repeated_positions_keeps_its_width(rows, half, batch, seq):
    """Every dim static_dim reads is the one onnxruntime computes, and the table's width is read."""
    import numpy as np
    import onnxruntime as ort

    width = 2 * half
    values = ", ".join(str(float(v)) for v in range(rows * width))
    proto = onnx.shape_inference.infer_shapes(
        onnx.parser.parse_model(TABLE_TEXT.format(rows=rows, width=width, values=values, half=half)))
    model = ir.from_proto(proto)
    found = {v.name: v for n in model.graph for v in n.outputs}
    for value in found.values():  # what the export stores: no dim of an intermediate known
        if value.shape is not None and len(value.shape) > 1 and value.producer().op_type != "Constant":
            value.shape = ir.Shape([f"{value.name}_{i}" for i in range(len(value.shape))])
    positions = np.tile(np.arange(seq, dtype=np.int64)[None] % rows, (batch, 1))
    outputs = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"position_ids": positions})
    for name, array in zip(["gathered", "sin"], outputs):
        for axis, size in enumerate(array.shape):
            assert static_dim(found[name], axis) in (None, size), (name, axis)
    assert static_dim(found["gathered"], 2) == width and static_dim(found["sin"], 2) == half

"""shape-reads: Reshape targets and Shape reads answered from proven dim sources, the outputs unchanged.

The graphs are the shape bookkeeping the exporters write around a head
split, in drawn spellings: TorchScript's ``Reshape(x, Concat(Shape(x)[0],
Shape(x)[1], -1, D))`` (by Gather, or by Shape's start/end), the rotary
pass's ``Expand(table, Concat(Shape(q_heads)[0], Shape(q_heads)[2], D/2))``
and the merge back. After the pass every Shape reads a graph input, every
Reshape target is a constant, the declared shapes name the input's dims, and
onnxruntime gives the same outputs on drawn sizes. A target that reads
another tensor's dims (equal only if the caller says so) is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qgraph_passes.dim_sources import Const, DimSources, InputDim
from qgraph_passes.shape_reads import ShapeReadsPass

_DIMS_BY_GATHER = """
    shape = Shape({of})
    zero = Constant <value_int = 0> ()
    one = Constant <value_int = 1> ()
    b = Gather <axis = 0> (shape, zero)
    s = Gather <axis = 0> (shape, one)
    ax0 = Constant <value_ints = [0]> ()
    bu = Unsqueeze(b, ax0)
    su = Unsqueeze(s, ax0)
"""
_DIMS_BY_SLICES = """
    bu = Shape <start = 0, end = 1> ({of})
    su = Shape <start = 1, end = 2> ({of})
"""

GRAPH = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[B, S, {hidden}] x, float[1, {tab_len}, {half}] tab, float[B2, S2, {hidden}] y) => (float[b1, s1, h1] table,
                                                                                   float[b2, s2, f2] merged,
                                                                                   float[b3, h3, s3, d3] qh) {{
    {dims}
    minus = Constant <value_ints = [-1]> ()
    split = Constant <value_ints = [{split}]> ()
    target = Concat <axis = 0> (bu, su, {tail})
    heads = Reshape(x, target)
    qh = Transpose <perm = [0, 2, 1, 3]> (heads)
    qb = Shape <start = 0, end = 1> (qh)
    qs = Shape <start = 2, end = 3> (qh)
    halfd = Constant <value_ints = [{half}]> ()
    table_shape = Concat <axis = 0> (qb, qs, halfd)
    table = Expand(tab, table_shape)
    back = Transpose <perm = [0, 2, 1, 3]> (qh)
    bb = Shape <start = 0, end = 2> (back)
    merged_shape = Concat <axis = 0> (bb, minus)
    merged = Reshape(back, merged_shape)
}}
"""


def _model(heads: int, d: int, by_gather: bool, minus_last: bool, of: str = "x", tab_len: str = "S") -> ir.Model:
    dims = (_DIMS_BY_GATHER if by_gather else _DIMS_BY_SLICES).format(of=of)
    # the head count or the head size written, the other one inferred (-1)
    tail = "split, minus" if not minus_last else "minus, split"
    text = GRAPH.format(hidden=heads * d, half=d // 2, dims=dims, split=heads if not minus_last else d, tail=tail,
                        tab_len=tab_len)
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    model = ir.from_proto(proto)
    for value in (v for n in model.graph for v in n.outputs):  # what a TorchScript export stores: symbolic
        if value.name in ("heads", "qh", "back", "merged", "table") and value.shape is not None:
            value.shape = ir.Shape([f"{value.name}_{i}" for i in range(len(value.shape))])
    return model


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _by_name(model: ir.Model) -> dict[str, ir.Value]:
    return {v.name: v for n in model.graph for v in n.outputs}


@settings(max_examples=12, deadline=None, derandomize=True)
@given(heads=st.integers(1, 4), d=st.sampled_from([2, 4, 8]), by_gather=st.booleans(), minus_last=st.booleans(),
       data=st.data())
def test_the_head_split_bookkeeping_reads_the_inputs_and_the_outputs_stay(heads, d, by_gather, minus_last, data):
    batch = data.draw(st.integers(1, 3), label="batch")
    seq = data.draw(st.integers(1, 6).filter(lambda s: s != heads), label="seq")  # a swapped axis would show
    rng = np.random.default_rng(batch * 100 + seq)
    feeds = {"x": rng.standard_normal((batch, seq, heads * d)).astype(np.float32),
             "tab": rng.standard_normal((1, seq, d // 2)).astype(np.float32),
             "y": np.zeros((1, 1, heads * d), np.float32)}
    model = _model(heads, d, by_gather, minus_last)
    expected = _run(model, feeds)
    result = ShapeReadsPass()(model)
    assert result.modified
    got = _run(model, feeds)
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)
    x = model.graph.inputs[0]
    shapes = [n for n in model.graph if n.op_type == "Shape"]
    assert shapes and all(n.inputs[0] is x for n in shapes), [n.inputs[0].name for n in shapes]
    reshapes = [n for n in model.graph if n.op_type == "Reshape"]
    assert reshapes and all(ir.convenience.get_const_tensor(n.inputs[1]) is not None for n in reshapes)
    values = _by_name(model)
    batch_dim, seq_dim = x.shape[0], x.shape[1]
    assert list(values["heads"].shape) == [batch_dim, seq_dim, heads, d]
    assert list(values["merged"].shape) == [batch_dim, seq_dim, heads * d]
    table = values["table"].shape  # its length is the larger of tab's and q's: equal, or one is 1 (not proven)
    assert table[0] == batch_dim and table[2] == d // 2


@pytest.mark.parametrize("by_gather", [True, False])
def test_a_target_read_from_another_tensor_is_left_alone(by_gather):
    """Reshape(x, Concat(Shape(y)[0], Shape(y)[1], ...)): y's dims equal x's only when the caller makes them."""
    model = _model(2, 4, by_gather, minus_last=False, of="y")
    heads = next(n for n in model.graph if n.op_type == "Reshape" and n.outputs[0].name == "heads")
    heads.name = "heads_node"
    target = heads.inputs[1]
    shape_reads = ShapeReadsPass()
    shape_reads(model)
    assert heads.inputs[1] is target and ir.convenience.get_const_tensor(target) is None
    # reported, not skipped in silence: the note names the node and both values, the near miss counts it
    assert any("Reshape 'heads_node'" in n and "dim 0 of 'y', not proven equal to dim 0 of the reshaped value 'x'" in n
               for n in shape_reads.report.notes), shape_reads.report.notes
    assert shape_reads.report.near_misses["reshape-target"]["candidates"] == 1
    y = model.graph.inputs[2]
    assert any(n.op_type == "Shape" and n.inputs[0] is y for n in model.graph)


@pytest.mark.parametrize("tab_len", ["S", "T"])
def test_dim_sources_follow_the_ops_and_stop_where_nothing_is_proven(tab_len):
    """tab declared [1, S, D/2] has x's S (the IR spec: one dim_param, one value); [1, T, D/2] does not."""
    model = _model(4, 8, by_gather=True, minus_last=False, tab_len=tab_len)
    dims = DimSources(model.graph)
    values = _by_name(model)
    x = model.graph.inputs[0]
    assert dims.source(values["qh"], 0) == InputDim(x, 0)
    assert dims.source(values["qh"], 2) == InputDim(x, 1)  # the Transpose moved the sequence axis
    assert dims.source(values["qh"], 1) == Const(4)  # the -1: x's width 32 over the written 8
    assert dims.source(values["table"], 0) == InputDim(x, 0)  # tab's batch is 1: the Expand's target says
    tab = model.graph.inputs[1]
    if tab_len == "S":
        assert dims.source(tab, 1) == InputDim(x, 1)  # the caller declared it x's length
        assert dims.source(values["table"], 1) == InputDim(x, 1)
    else:
        assert dims.source(tab, 1) == InputDim(tab, 1)  # not x's: only the Expand says they meet
        assert dims.source(values["table"], 1) is None  # tab's length or q's, whichever is not 1: not proven
    assert dims.source(values["table"], 2) == Const(4)
    assert dims.source(values["merged"], 2) == Const(32)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_declared_one_left_stale_by_an_earlier_pass_is_not_believed(batch):
    """t's stored shape says batch 1 (as kv-cache leaves a rotary table it widened); the Add says x's batch."""
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S, 4] x) => (int64[1] n) {
        zero = Constant <value_float = 0.0> ()
        t = Add(x, zero)
        n = Shape <start = 0, end = 1> (t)
    }
    """
    model = ir.from_proto(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))
    t = _by_name(model)["t"]
    t.shape = ir.Shape([1, "S", 4])
    feeds = {"x": np.zeros((batch, 2, 4), np.float32)}
    ShapeReadsPass()(model)
    assert _run(model, feeds)[0].tolist() == [batch]
    shape = next(n for n in model.graph if n.op_type == "Shape")
    assert shape.inputs[0] is model.graph.inputs[0]  # read from x, whose batch it is

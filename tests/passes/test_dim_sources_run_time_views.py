"""dim_sources on the shape bookkeeping of TorchScript's GPT-2 / OPT / GPT-Neo / Phi-3 exports, and what it enables.

* A Reshape's -1 is x's one dim the other entries leave (``view(-1, S)`` of
  the ids, ``view(B, S, -1, D)`` of a head split); two dims left are a
  product, no input's dim, and unknown.
* A Split's parts along its axis (a constant ``split``, or equal parts).
* ``Slice`` of a shape tensor (``Shape(x)[-1:]``), and a Slice's length.
* shape-reads removes a Slice proven whole and drops a Concat operand proven
  empty (Phi-3's rotary of ``x[..., :d]`` with d the whole head); a
  reversing Slice of full length is kept.
* attention-io keeps a merge whose target is not proven ``[B, S, H*D]`` as
  a Reshape after the packed Attention when it reads that output alike
  (GPT-Neo's dynamo ``[B, Min(128, S), H*D]``), and refuses it when an entry
  from index 2 on could copy a dim.

Every claim is checked against the shapes and values onnxruntime gives on
sizes hypothesis draws.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st
from qgraph_passes.attention_io import AttentionIOPass
from qgraph_passes.dim_sources import Const, DimSources, InputDim
from qgraph_passes.shape_reads import ShapeReadsPass

INT64_MAX = 2**63 - 1


def _model(text: str) -> ir.Model:
    return ir.from_proto(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(model).run(None, feeds)


def _erase_shapes(model: ir.Model) -> None:
    """Forget every declared shape but the inputs' and the constants' (so nothing is read from shape inference)."""
    for node in model.graph:
        for value in node.outputs:
            if value.shape is not None and ir.convenience.get_const_tensor(value) is None:
                value.shape = ir.Shape([f"x{id(value)}_{i}" for i in range(len(value.shape))])


def _truth(source, sizes: dict[str, int], x: ir.Value) -> int:
    if isinstance(source, Const):
        return int(source)
    assert source.value is x
    return sizes["B" if source.axis == 0 else "S"]


# -- a Reshape's -1 ------------------------------------------------------------------------------------


@st.composite
def views(draw):
    """x: [B, S, H*D]; a target that is a drawn order of B, S, H, D (numbers, or x's dims read by Shape), one
    entry -1 -- or, with ``merged``, -1 standing for two of them (a product: not a dim)."""
    h, d = draw(st.integers(2, 4)), draw(st.integers(2, 5))
    tokens = draw(st.permutations(["B", "S", h, d]))
    merged = draw(st.booleans())
    at = draw(st.integers(0, len(tokens) - (2 if merged else 1)))
    if merged:
        inferred = tokens[at:at + 2]
        tokens = [*tokens[:at], -1, *tokens[at + 2:]]
    else:
        inferred = [tokens[at]]
        tokens = [*tokens[:at], -1, *tokens[at + 1:]]
    zero_copies = draw(st.booleans())  # a dim at its own axis written as 0 (allowzero 0)
    return h, d, tokens, inferred, zero_copies


@settings(max_examples=40, deadline=None, derandomize=True)
@given(view=views(), batch=st.integers(1, 3), seq=st.integers(1, 4))
def test_the_inferred_dim_of_a_view_is_the_one_dim_left_and_a_product_is_unknown(view, batch, seq):
    h, d, tokens, inferred, zero_copies = view
    lines, pieces = [], []
    for i, token in enumerate(tokens):
        if token in ("B", "S"):
            own = (token == "B" and i == 0) or (token == "S" and i == 1)
            if own and zero_copies:
                lines.append(f"e{i} = Constant <value_ints = [0]> ()")
            else:
                axis = 0 if token == "B" else 1
                lines.append(f"e{i} = Shape <start = {axis}, end = {axis + 1}> (x)")
        else:
            lines.append(f"e{i} = Constant <value_ints = [{token}]> ()")
        pieces.append(f"e{i}")
    body = "\n        ".join(lines)
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S, {h * d}] x) => (float[o1, o2, o3, o4] y) {{
        {body}
        target = Concat <axis = 0> ({", ".join(pieces)})
        y = Reshape(x, target)
    }}
    """
    model = _model(text)
    _erase_shapes(model)
    x, y = model.graph.inputs[0], model.graph.outputs[0]
    sizes = {"B": batch, "S": seq}
    (got,) = _run(model, {"x": np.zeros((batch, seq, h * d), np.float32)})
    dims = DimSources(model.graph)
    sources = [dims.source(y, axis) for axis in range(len(tokens))]
    for axis, source in enumerate(sources):  # every proven dim is what onnxruntime gives
        if source is not None:
            assert _truth(source, sizes, x) == got.shape[axis], (tokens, axis, source)
    at = tokens.index(-1)
    if len(inferred) == 1:  # the one dim left is proven
        expected = InputDim(x, {"B": 0, "S": 1}[inferred[0]]) if inferred[0] in ("B", "S") else Const(inferred[0])
        assert sources[at] == expected
    elif any(t in ("B", "S") for t in inferred):  # a product with a dim: no input's dim
        assert sources[at] is None


@settings(max_examples=10, deadline=None, derandomize=True)
@given(c=st.integers(1, 3), times=st.integers(1, 3))
def test_an_entry_that_is_no_dim_of_x_leaves_the_inferred_dim_unknown(c, times):
    """x: [B, 4] viewed as [C, -1, 4] with C another input's dim: the -1 is B / C, no dim of any input (the
    entry C does not cancel against a dim of x)."""
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, 4] x, float[C] z) => (float[o1, o2, o3] y) {
        c = Shape(z)
        rest = Constant <value_ints = [-1, 4]> ()
        target = Concat <axis = 0> (c, rest)
        y = Reshape(x, target)
    }
    """
    model = _model(text)
    _erase_shapes(model)
    x, z = model.graph.inputs
    (got,) = _run(model, {"x": np.zeros((c * times, 4), np.float32), "z": np.zeros(c, np.float32)})
    dims = DimSources(model.graph)
    y = model.graph.outputs[0]
    assert got.shape == (c, times, 4)
    assert dims.source(y, 0) == InputDim(z, 0) and dims.source(y, 1) is None and dims.source(y, 2) == Const(4)


# -- Split's parts and Slice lengths ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True)
@given(width=st.integers(1, 12), parts=st.integers(1, 4), given_split=st.booleans(), data=st.data())
def test_the_parts_of_a_split_along_its_axis_are_what_onnxruntime_gives(width, parts, given_split, data):
    if given_split:
        cuts = sorted(data.draw(st.lists(st.integers(0, width), min_size=parts - 1, max_size=parts - 1)))
        split = np.diff([0, *cuts, width]).tolist()
        head = f"split = Constant <value_ints = {split}> ()"
        call = "Split <axis = 2> (x, split)"
    else:
        head = ""
        call = f"Split <axis = 2, num_outputs = {parts}> (x)"
    outs = ", ".join(f"p{i}" for i in range(parts))
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S, {width}] x) => ({", ".join(f"float[a{i}, b{i}, c{i}] p{i}" for i in range(parts))}) {{
        {head}
        {outs} = {call}
    }}
    """
    if not given_split and parts > width:
        return  # onnxruntime refuses more parts than elements
    model = ir.from_proto(onnx.parser.parse_model(text))
    got = _run(model, {"x": np.zeros((2, 3, width), np.float32)})
    dims = DimSources(model.graph)
    x = model.graph.inputs[0]
    for value, array in zip(model.graph.outputs, got, strict=True):
        assert dims.source(value, 2) == Const(array.shape[2])
        assert dims.source(value, 0) == InputDim(x, 0) and dims.source(value, 1) == InputDim(x, 1)


BOUNDS = st.sampled_from([0, 1, 3, 7, -1, -3, -20, 20, INT64_MAX, -INT64_MAX - 1])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(0, 8), start=BOUNDS, end=BOUNDS, step=st.sampled_from([1, 2, 3, -1, -2]))
def test_a_slice_and_a_slice_of_a_shape_have_the_length_onnxruntime_gives(n, start, end, step):
    """Positive steps are proven (a number over a number), negative ones are not followed; the entries of a
    sliced Shape are the dims onnxruntime reads there, in order."""
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, {n}] x, float[B, S, 4, 5, 6, 7, 8, 9] z) => (float[b, m] y, int64[k] picked) {{
        starts = Constant <value_ints = [{start}]> ()
        ends = Constant <value_ints = [{end}]> ()
        axes = Constant <value_ints = [1]> ()
        zero = Constant <value_ints = [0]> ()
        steps = Constant <value_ints = [{step}]> ()
        y = Slice(x, starts, ends, axes, steps)
        shape = Shape(z)
        picked = Slice(shape, starts, ends, zero, steps)
    }}
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    y, picked = model.graph.outputs
    x, z = model.graph.inputs
    got_y, got_picked = _run(model, {"x": np.zeros((2, n), np.float32), "z": np.zeros((2, 3, 4, 5, 6, 7, 8, 9),
                                                                                        np.float32)})
    dims = DimSources(model.graph)
    source = dims.source(y, 1)
    assert (source == Const(got_y.shape[1])) if step > 0 else source is None
    entries = dims.entries(picked)
    if step < 0:
        assert entries is None
        return
    truth = {InputDim(x, 0): 2, InputDim(z, 1): 3}  # z's B is x's: both inputs declare it
    assert [truth.get(e, e) for e in entries] == got_picked.tolist()


def test_a_slice_to_the_end_of_a_dim_keeps_that_dim_and_cumsum_keeps_its_input_dims():
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (int64[B, S] ids) => (int64[b, s] y, int64[b2, s2] c) {
        starts = Constant <value_ints = [0]> ()
        ends = Constant <value_ints = [9223372036854775807]> ()
        axes = Constant <value_ints = [1]> ()
        y = Slice(ids, starts, ends, axes)
        one = Constant <value_int = 1> ()
        c = CumSum(ids, one)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    dims = DimSources(model.graph)
    ids = model.graph.inputs[0]
    y, c = model.graph.outputs
    assert dims.source(y, 1) == InputDim(ids, 1) and dims.source(c, 0) == InputDim(ids, 0)
    assert dims.source(c, 1) == InputDim(ids, 1)


# -- whole slices and empty operands (shape-reads) ------------------------------------------------------------

# Phi-3's TorchScript rotary: x[..., :d] turned, x[..., d:] kept, d read from the table's last dim.
PARTIAL_ROTARY = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[B, S, {width}] x, float[S, {table}] cos) => (float[o1, o2, o3] y) {{
    last = Constant <value_int = -1> ()
    shape = Shape(cos)
    d = Gather <axis = 0> (shape, last)
    zero = Constant <value_ints = [0]> ()
    axis = Constant <value_ints = [-1]> ()
    big = Constant <value_ints = [9223372036854775807]> ()
    ax = Constant <value_ints = [0]> ()
    du = Unsqueeze(d, ax)
    {step_line}
    rot = Slice(x, zero, du, axis{steps})
    rest = Slice(x, du, big, axis)
    turned = Sin(rot)
    joined = Concat <axis = -1> (turned, rest)
    y = Relu(joined)
}}
"""


@settings(max_examples=12, deadline=None, derandomize=True)
@given(width=st.integers(1, 6), short=st.integers(0, 3), reverse=st.booleans(), batch=st.integers(1, 2),
       seq=st.integers(1, 3))
def test_a_whole_slice_is_its_input_and_an_empty_operand_is_dropped(width, short, reverse, batch, seq):
    table = max(width - short, 0)
    steps = ", minus" if reverse else ""
    step_line = "minus = Constant <value_ints = [-1]> ()" if reverse else ""
    text = PARTIAL_ROTARY.format(width=width, table=table, steps=steps, step_line=step_line)
    if reverse:  # x[..., 0:d:-1] is empty; reversing the whole head is x[..., ::-1]: from -1 down past 0
        text = text.replace("rot = Slice(x, zero, du, axis, minus)", "rot = Slice(x, last1, lowest, axis, minus)")
        text = text.replace("turned = Sin(rot)", "last1 = Constant <value_ints = [-1]> ()\n    "
                            "lowest = Constant <value_ints = [-9223372036854775808]> ()\n    turned = Sin(rot)")
    model = _model(text)
    rng = np.random.default_rng(width * 7 + short)
    feeds = {"x": rng.standard_normal((batch, seq, width)).astype(np.float32),
             "cos": np.zeros((seq, table), np.float32)}
    try:
        expected = _run(model, feeds)
    except Exception:  # noqa: BLE001 -- onnxruntime refuses this input: nothing to compare
        return
    shape_reads = ShapeReadsPass()
    shape_reads(model)
    ops = [n.op_type for n in model.graph if any(o.uses() or o.is_graph_output() for o in n.outputs)]  # live
    # x[..., :d] is x when d is the width and empty when it is 0 (x[..., d:] the other way round); a full
    # reversal is neither
    partial = 0 < table < width
    assert ops.count("Slice") == int(reverse or partial) + int(partial)
    assert ("Concat" in ops) == ((reverse or table > 0) and table < width)
    (got,) = _run(model, feeds)
    np.testing.assert_array_equal(got, expected[0])


# -- a merge kept after the packed Attention (attention-io) ---------------------------------------------------

MERGE = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[B, S, 16] q3, float[B, S, 16] k3, float[B, S, 16] v3, float[B, 2, P, 8] past_k, float[B, 2, P, 8] past_v,
   float[B, 1, S, T] mask) => (float[{out}] out) {{
    split = Constant <value_ints = [0, 0, 2, 8]> ()
    qs = Reshape(q3, split)
    ks = Reshape(k3, split)
    vs = Reshape(v3, split)
    q = Transpose <perm = [0, 2, 1, 3]> (qs)
    k = Transpose <perm = [0, 2, 1, 3]> (ks)
    v = Transpose <perm = [0, 2, 1, 3]> (vs)
    y, present_k, present_v = Attention(q, k, v, mask, past_k, past_v)
    yt = Transpose <perm = [0, 2, 1, 3]> (y)
    b = Shape <start = 0, end = 1> (q3)
    s = Shape <start = 1, end = 2> (q3)
    s0 = Squeeze(s)
    cap = Constant <value_int = 128> ()
    m = Min(cap, s0)
    ax = Constant <value_ints = [0]> ()
    mu = Unsqueeze(m, ax)
    {third}
    target = Concat <axis = 0> (b, mu, w{tail})
    out = Reshape <allowzero = {allowzero}> (yt, target)
}}
"""


@settings(max_examples=16, deadline=None, derandomize=True)
@given(allowzero=st.sampled_from([0, 1]), third=st.sampled_from(["number", "unproven zero", "unproven 16"]),
       batch=st.integers(1, 2), seq=st.integers(1, 3), past=st.integers(0, 2))
def test_a_merge_not_proven_stays_after_the_packed_output_when_it_reads_it_alike(allowzero, third, batch, seq, past):
    """GPT-Neo's dynamo merge: [B, Min(128, S), 16]. Kept after the packed output when allowzero is 1 or its
    entry 2 is a number; an entry 2 computed at run time (Abs: not followed) could be a 0 that copies a dim
    of the 4-D input the 3-D one lacks, and the layer is refused, with the reason in the report."""
    lines = {"number": "w = Constant <value_ints = [16]> ()",
             # [B, S, 0, 8]: the 0 copies the 2 heads of [B, S, 2, 8]; of the packed [B, S, 16] it would copy 16
             "unproven zero": "zw = Constant <value_ints = [0]> ()\n    w = Abs(zw)\n    "
                              "d = Constant <value_ints = [8]> ()",
             "unproven 16": "sw = Constant <value_ints = [16]> ()\n    w = Abs(sw)"}
    if third == "unproven zero" and allowzero:
        return  # a literal 0-sized dim: onnxruntime refuses the Reshape of a non-empty tensor
    four = third == "unproven zero"
    model = _model(MERGE.format(third=lines[third], allowzero=allowzero, tail=", d" if four else "",
                                out="o1, o2, o3, o4" if four else "o1, o2, o3"))
    rng = np.random.default_rng(seq * 10 + past)
    total = past + seq
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in (
        ("q3", (batch, seq, 16)), ("k3", (batch, seq, 16)), ("v3", (batch, seq, 16)),
        ("past_k", (batch, 2, past, 8)), ("past_v", (batch, 2, past, 8)), ("mask", (batch, 1, seq, total)))}
    expected = _run(model, feeds)
    io_pass = AttentionIOPass()
    io_pass(model)
    attention = next(n for n in model.graph if n.op_type == "Attention")
    packed = "q_num_heads" in attention.attributes
    assert packed == (allowzero == 1 or third == "number")
    if packed:
        assert attention.attributes["q_num_heads"].value == attention.attributes["kv_num_heads"].value == 2
        (merge,) = [u.node for u in attention.outputs[0].uses()]
        assert merge.op_type == "Reshape" and merge.attributes["allowzero"].value == allowzero
        assert not [n for n in model.graph if n.op_type == "Transpose"]
    else:
        assert any("cannot stay after the packed output" in n and "entry 2" in n for n in io_pass.report.notes) or \
            any("cannot stay after the packed output" in str(v) for v in io_pass.report.near_misses.values())
    (got,) = _run(model, feeds)
    np.testing.assert_allclose(got, expected[0], rtol=1e-5, atol=1e-6)

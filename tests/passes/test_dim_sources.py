"""dim_sources: the proofs added for the SmolLM2 exports, each with the case where it must refuse.

* Graph inputs that carry the same ``dim_param`` are one value (the ONNX IR
  spec, docs/IR.md *Static tensor shapes*): qgraph's dynamo export splits the
  heads of ``input_ids``' hidden states with a target read from
  ``Shape(attention_mask)``, both declared ``[batch, seq]``. Different names
  prove nothing, and neither does the name of an intermediate value.
* Integer arithmetic on shape entries: TorchScript's repeat_kv target holds
  ``kv_heads * n_rep`` as a ``Mul`` of two numbers. A dim times a number
  other than 1 is not an input's dim, and stays unknown.
* ``Range(0, d, 1)`` is d long (TorchScript's mask indices).
* Attention's 4-D output is ``[B, Hq, S, Dv]``: q's first three dims, v's head
  size (TorchScript's Phi and StarCoder2 view it as ``[B, -1, S, Dv]``).

Every graph is hand-built and small; where a pass rewrites it, onnxruntime
runs it before and after on sizes hypothesis draws.
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


def _model(text: str) -> ir.Model:
    return ir.from_proto(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _by_name(model: ir.Model) -> dict[str, ir.Value]:
    return {v.name: v for n in model.graph for v in n.outputs}


def _reshape(model: ir.Model, output: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "Reshape" and n.outputs[0].name == output)


def _is_const(value: ir.Value) -> bool:
    return ir.convenience.get_const_tensor(value) is not None


# -- equal dim_params on graph inputs -------------------------------------------------------------

# The head split of qgraph's dynamo export: x's heads split with the batch and length of the mask.
HEAD_SPLIT_BY_MASK = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[{x_batch}, {x_seq}, 8] x, int64[{mask_batch}, {mask_seq}] mask) => (float[o1, o2, o3, o4] heads) {{
    b = Shape <start = 0, end = 1> (mask)
    s = Shape <start = 1, end = 2> (mask)
    tail = Constant <value_ints = [-1, 4]> ()
    target = Concat <axis = 0> (b, s, tail)
    heads = Reshape(x, target)
}}
"""


def _head_split(x_dims=("batch", "seq"), mask_dims=("batch", "seq")) -> ir.Model:
    return _model(HEAD_SPLIT_BY_MASK.format(x_batch=x_dims[0], x_seq=x_dims[1],
                                            mask_batch=mask_dims[0], mask_seq=mask_dims[1]))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), seq=st.integers(1, 5))
def test_a_target_read_from_an_input_declared_with_the_same_dims_is_proven(batch, seq):
    model = _head_split()
    feeds = {"x": np.arange(batch * seq * 8, dtype=np.float32).reshape(batch, seq, 8),
             "mask": np.ones((batch, seq), np.int64)}  # equal dims: what [batch, seq] on both obliges the caller to
    expected = _run(model, feeds)
    shape_reads = ShapeReadsPass()
    shape_reads(model)
    heads = _reshape(model, "heads")
    assert _is_const(heads.inputs[1])
    assert ir.convenience.get_const_tensor(heads.inputs[1]).numpy().tolist() == [0, 0, 2, 4]
    assert not shape_reads.report.near_misses
    x = model.graph.inputs[0]
    assert list(heads.outputs[0].shape) == [x.shape[0], x.shape[1], 2, 4]
    (got,) = _run(model, feeds)
    assert got.shape == expected[0].shape and np.array_equal(got, expected[0])


@pytest.mark.parametrize("mask_dims", [("batch2", "seq"), ("batch", "seq2"), ("batch2", "seq2")])
def test_a_target_read_from_an_input_with_other_dim_names_is_kept_and_named(mask_dims):
    model = _head_split(mask_dims=mask_dims)
    heads = _reshape(model, "heads")
    heads.name = "split_heads"
    target = heads.inputs[1]
    shape_reads = ShapeReadsPass()
    shape_reads(model)
    assert heads.inputs[1] is target and not _is_const(target)
    axis = 0 if mask_dims[0] != "batch" else 1
    note = next(n for n in shape_reads.report.notes if "Reshape 'split_heads'" in n)
    assert f"entry {axis} of its target is dim {axis} of 'mask', not proven equal to dim {axis} of the reshaped " \
           f"value 'x'" in note
    assert shape_reads.report.near_misses["reshape-target"]["candidates"] == 1


def test_dims_of_inputs_with_one_name_have_one_source_and_other_names_their_own():
    model = _head_split(mask_dims=("batch", "other"))
    dims = DimSources(model.graph)
    x, mask = model.graph.inputs
    assert dims.source(mask, 0) == dims.source(x, 0) == InputDim(x, 0)  # the first input that declares it
    assert dims.source(mask, 1) == InputDim(mask, 1) != dims.source(x, 1)


def test_the_names_of_intermediate_values_prove_nothing():
    """t is computed from y (declared [n, seq]); a stale or misleading declared [batch, seq] on t is not read."""
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[batch, seq, 8] x, float[n, seq, 8] y) => (float[o1, o2, o3, o4] heads) {
        t = Relu(y)
        b = Shape <start = 0, end = 1> (t)
        rest = Constant <value_ints = [0, 2, 4]> ()
        target = Concat <axis = 0> (b, rest)
        heads = Reshape(x, target)
    }
    """
    model = _model(text)
    values = _by_name(model)
    values["t"].shape = ir.Shape(["batch", "seq", 8])
    x, y = model.graph.inputs
    dims = DimSources(model.graph)
    assert dims.source(values["t"], 0) == InputDim(y, 0)
    assert dims.source(values["t"], 1) == InputDim(x, 1)  # y's seq is x's: both inputs declare it
    shape_reads = ShapeReadsPass()
    shape_reads(model)
    assert not _is_const(_reshape(model, "heads").inputs[1])
    assert shape_reads.report.near_misses["reshape-target"]["candidates"] == 1


# -- arithmetic on shape entries --------------------------------------------------------------------

# TorchScript's repeat_kv shape bookkeeping: the merged head count is a Mul of two numbers read from shapes.
MERGE_BY_PRODUCT = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[B, S, {heads}, {rep}, 4] x) => (float[o1, o2, o3, o4] merged) {{
    shape = Shape(x)
    i0 = Constant <value_int = 0> ()
    i1 = Constant <value_int = 1> ()
    i2 = Constant <value_int = 2> ()
    i3 = Constant <value_int = 3> ()
    ax = Constant <value_ints = [0]> ()
    b = Gather <axis = 0> (shape, i0)
    s = Gather <axis = 0> (shape, i1)
    h = Gather <axis = 0> (shape, i2)
    r = Gather <axis = 0> (shape, i3)
    product = Mul({left}, {right})
    bu = Unsqueeze(b, ax)
    su = Unsqueeze(s, ax)
    pu = Unsqueeze(product, ax)
    d = Constant <value_ints = [4]> ()
    target = Concat <axis = 0> (bu, su, pu, d)
    merged = Reshape(x, target)
}}
"""


@settings(max_examples=8, deadline=None, derandomize=True)
@given(heads=st.integers(1, 4), rep=st.integers(1, 4), batch=st.integers(1, 3), seq=st.integers(1, 4))
def test_a_product_of_two_numbers_in_a_target_is_that_number(heads, rep, batch, seq):
    model = _model(MERGE_BY_PRODUCT.format(heads=heads, rep=rep, left="h", right="r"))
    feeds = {"x": np.arange(batch * seq * heads * rep * 4, dtype=np.float32).reshape(batch, seq, heads, rep, 4)}
    expected = _run(model, feeds)
    dims = DimSources(model.graph)
    assert dims.entries(_by_name(model)["product"]) == [Const(heads * rep)]
    ShapeReadsPass()(model)
    merged = _reshape(model, "merged")
    assert ir.convenience.get_const_tensor(merged.inputs[1]).numpy().tolist() == [0, 0, heads * rep, 4]
    (got,) = _run(model, feeds)
    assert got.shape == expected[0].shape and np.array_equal(got, expected[0])


def test_a_dim_times_a_number_is_not_a_dim_and_the_target_is_kept():
    """Reshape to [B, 2*S, ...]: 2*S is no input's dim; the note names the Mul that stops the proof."""
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S, 4] x) => (float[o1, o2, o3] y) {
        shape = Shape(x)
        i1 = Constant <value_int = 1> ()
        two = Constant <value_int = 2> ()
        s = Gather <axis = 0> (shape, i1)
        twice = Mul(s, two)
        ax = Constant <value_ints = [0]> ()
        tu = Unsqueeze(twice, ax)
        b = Shape <start = 0, end = 1> (x)
        d = Constant <value_ints = [2]> ()
        target = Concat <axis = 0> (b, tu, d)
        y = Reshape(x, target)
    }
    """
    model = _model(text)
    dims = DimSources(model.graph)
    values = _by_name(model)
    assert dims.entries(values["twice"]) == [None]
    assert dims.source(values["y"], 1) is None and dims.source(values["y"], 0) == InputDim(model.graph.inputs[0], 0)
    shape_reads = ShapeReadsPass()
    shape_reads(model)
    assert not _is_const(_reshape(model, "y").inputs[1])
    assert shape_reads.report.near_misses["reshape-target"]["candidates"] == 1
    assert any("entry 1 of its target is not proven" in n for n in shape_reads.report.notes), shape_reads.report.notes


@pytest.mark.parametrize(("op", "left", "right", "expected"), [
    ("Mul", "dim", 1, "dim"), ("Mul", 1, "dim", "dim"), ("Mul", "dim", 2, None), ("Mul", 3, 3, 9),
    ("Add", "dim", 0, "dim"), ("Add", 0, "dim", "dim"), ("Add", "dim", 1, None), ("Add", 2, 3, 5),
    ("Sub", "dim", 0, "dim"), ("Sub", 0, "dim", None), ("Sub", 2, 3, -1),
    ("Div", "dim", 1, "dim"), ("Div", 7, 2, 3), ("Div", -7, 2, None), ("Div", 1, "dim", None), ("Div", 4, 0, None),
])
def test_arithmetic_on_entries_folds_numbers_and_keeps_a_dim_only_under_its_identity(op, left, right, expected):
    operand = {"dim": "s", **{v: f"c{v}".replace("-", "m") for v in (left, right) if v != "dim"}}
    consts = "\n".join(f"    {name} = Constant <value_int = {v}> ()" for v, name in operand.items() if v != "dim")
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S] x) => (int64 r) {{
        shape = Shape(x)
        i1 = Constant <value_int = 1> ()
        s = Gather <axis = 0> (shape, i1)
    {consts}
        r = {op}({operand[left]}, {operand[right]})
    }}
    """
    model = _model(text)
    x = model.graph.inputs[0]
    got = DimSources(model.graph).entries(model.graph.outputs[0])
    assert got == [InputDim(x, 1) if expected == "dim" else None if expected is None else Const(expected)]


def test_a_float_product_is_not_folded():
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S] x) => (float r) {
        a = Constant <value_float = 1.5> ()
        b = Constant <value_float = 3.0> ()
        r = Mul(a, b)
    }
    """
    model = _model(text)
    assert DimSources(model.graph).entries(model.graph.outputs[0]) is None


# -- Range -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("start", "delta", "proven"), [(0, 1, True), (1, 1, False), (0, 2, False)])
def test_a_range_counting_from_zero_by_one_is_as_long_as_its_limit(start, delta, proven):
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S] x) => (int64[n] r) {{
        shape = Shape(x)
        i1 = Constant <value_int = 1> ()
        s = Gather <axis = 0> (shape, i1)
        start = Constant <value_int = {start}> ()
        delta = Constant <value_int = {delta}> ()
        r = Range(start, s, delta)
    }}
    """
    model = _model(text)
    x = model.graph.inputs[0]
    model.graph.outputs[0].shape = ir.Shape(["n"])  # not a name shape inference could have made S
    got = DimSources(model.graph).source(model.graph.outputs[0], 0)
    assert got == (InputDim(x, 1) if proven else None)
    for seq in (0, 1, 5):  # where it is proven, onnxruntime agrees
        (r,) = _run(model, {"x": np.zeros((2, seq), np.float32)})
        assert len(r) == seq or not proven


@pytest.mark.parametrize(("start", "limit", "delta"), [(0, 10, 3), (5, 0, 1), (5, 0, -2), (2, 2, 1), (-3, 4, 2)])
def test_a_range_of_numbers_has_the_length_onnxruntime_gives_it(start, limit, delta):
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B] x) => (int64[n] r) {{
        start = Constant <value_int = {start}> ()
        limit = Constant <value_int = {limit}> ()
        delta = Constant <value_int = {delta}> ()
        r = Range(start, limit, delta)
    }}
    """
    model = _model(text)
    (r,) = _run(model, {"x": np.zeros(1, np.float32)})
    model.graph.outputs[0].shape = ir.Shape(["n"])  # as a TorchScript export declares it: not the inferred length
    assert DimSources(model.graph).source(model.graph.outputs[0], 0) == Const(len(r))


# -- a Reshape only Shape read -----------------------------------------------------------------------

def test_a_reshape_whose_shape_only_was_read_is_left_unused_and_noted_not_counted():
    """TorchScript's repeat_kv: Reshape(e, [B, H*R, S, D]) of a 5-D e is read only by Shape(.)[3] for D."""
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, 2, 3, S, 4] e) => (float[o1, o2] out) {
        shape = Shape(e)
        i0 = Constant <value_int = 0> ()
        i1 = Constant <value_int = 1> ()
        i2 = Constant <value_int = 2> ()
        i3 = Constant <value_int = 3> ()
        ax = Constant <value_ints = [0]> ()
        b = Gather <axis = 0> (shape, i0)
        h = Gather <axis = 0> (shape, i1)
        r = Gather <axis = 0> (shape, i2)
        s = Gather <axis = 0> (shape, i3)
        hr = Mul(h, r)
        bu = Unsqueeze(b, ax)
        hu = Unsqueeze(hr, ax)
        su = Unsqueeze(s, ax)
        d = Constant <value_ints = [4]> ()
        target = Concat <axis = 0> (bu, hu, su, d)
        repeated = Reshape(e, target)
        width = Shape <start = 3, end = 4> (repeated)
        rows = Constant <value_ints = [-1]> ()
        flat_shape = Concat <axis = 0> (rows, width)
        out = Reshape(e, flat_shape)
    }
    """
    model = _model(text)
    feeds = {"e": np.arange(2 * 2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 2, 3, 5, 4)}
    expected = _run(model, feeds)
    repeated = _reshape(model, "repeated")
    repeated.name = "repeat_kv"
    shape_reads = ShapeReadsPass()
    shape_reads(model)
    assert not repeated.outputs[0].uses()  # the width is read from e's declared 4 now
    assert not shape_reads.report.near_misses
    assert any("Reshape 'repeat_kv' is no longer used" in n for n in shape_reads.report.notes)
    (got,) = _run(model, feeds)
    assert np.array_equal(got, expected[0])


def test_a_target_computed_by_an_op_not_followed_names_that_op():
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, S, 4] x) => (float[o1, o2, o3] y) {
        b = Shape <start = 0, end = 1> (x)
        s = Shape <start = 1, end = 2> (x)
        s_abs = Abs(s)
        d = Constant <value_ints = [4]> ()
        target = Concat <axis = 0> (b, s_abs, d)
        y = Reshape(x, target)
    }
    """
    model = _model(text)
    next(n for n in model.graph if n.op_type == "Abs").name = "abs_of_length"
    shape_reads = ShapeReadsPass()
    shape_reads(model)
    assert not _is_const(_reshape(model, "y").inputs[1])
    assert any("computed through Abs 'abs_of_length', which dim_sources does not follow" in n
               for n in shape_reads.report.notes), shape_reads.report.notes
    summary = shape_reads.report.near_misses["reshape-target"]["most_common_check"]
    assert "through Abs" in summary  # the op survives the summary's blanking of names


# -- what the user sees --------------------------------------------------------------------------------

def test_explain_names_each_reshape_and_the_table_says_where_the_names_are(tmp_path):
    """The table blanks names ('…') to group reasons; --explain reshape-target lists every Reshape by name."""
    import io

    from qgraph.cli import main

    model = _head_split(mask_dims=("other", "seq"))
    _reshape(model, "heads").name = "split_heads"
    path = tmp_path / "in.onnx"
    onnx.save(ir.to_proto(model), path)
    out = io.StringIO()
    assert main(["optimize", str(path), "--passes", "shape-reads", "--explain", "reshape-target"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "rule 'reshape-target' of pass 'shape-reads': 1 candidate(s), 0 rewritten"
    assert lines[1].startswith("  [no match] reshape-target at split_heads (Reshape): kept, computed at run time")
    assert "dim 0 of 'mask', not proven equal to dim 0 of the reshaped value 'x'" in lines[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]  # explain only: nothing written

    out = io.StringIO()
    assert main(["optimize", str(path), "--passes", "shape-reads", "-o", str(tmp_path / "out.onnx")], out=out) == 0
    line = next(x for x in out.getvalue().splitlines() if x.startswith("near miss in shape-reads"))
    assert line.endswith("(--explain reshape-target names each; a kept target is computed at run time, with the "
                         "same result)"), line

    same = _head_split()
    onnx.save(ir.to_proto(same), path)
    out = io.StringIO()
    assert main(["optimize", str(path), "--passes", "shape-reads", "--explain", "reshape-target"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("1 candidate(s), 1 rewritten") and "is the constant [0, 0, 2, 4]" in lines[1]


@pytest.mark.parametrize(("left", "right", "expected"), [
    ("[2, 3]", "[4]", [8, 12]), ("[4]", "[2, 3]", [8, 12]), ("[2, 3]", "[4, 5]", [8, 15]), ("[]", "[4]", []),
    ("[2, 3]", "[4, 5, 6]", None),
])
def test_arithmetic_on_entries_broadcasts_as_numpy_does(left, right, expected):
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B] x) => (int64[n] r) {{
        a = Constant <value_ints: ints = {left}> ()
        b = Constant <value_ints: ints = {right}> ()
        r = Mul(a, b)
    }}
    """
    model = ir.from_proto(onnx.parser.parse_model(text))  # no shape inference: it rejects the mismatched case
    for node in model.graph:
        for value in node.outputs:
            value.dtype = ir.DataType.INT64
            const = ir.convenience.get_const_tensor(value)
            value.shape = ir.Shape(const.shape if const is not None else ["n"])
    got = DimSources(model.graph).entries(model.graph.outputs[0])
    assert got == (None if expected is None else [Const(v) for v in expected])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(kv_heads=st.integers(1, 3), group=st.integers(1, 2), dk=st.sampled_from([4, 8]), dv=st.sampled_from([4, 8, 16]))
def test_the_attention_output_has_q_batch_heads_length_and_v_head_size(kv_heads, group, dk, dv):
    """Attention's 4-D output is [B, Hq, S, Dv]: the first three dims are q's, the last v's (what lets
    shape-reads remove TorchScript's ``view(B, -1, S, D)`` of it, StarCoder2's and Phi's); checked against
    the shape onnxruntime gives, with every stored shape but the inputs' erased."""
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, {kv_heads * group}, S, {dk}] q, float[B, {kv_heads}, T, {dk}] k, float[B, {kv_heads}, T, {dv}] v)
        => (float[o1, o2, o3, o4] y) {{
        y = Attention(q, k, v)
    }}
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    y = model.graph.outputs[0]
    dims = DimSources(model.graph)
    q, _, v = model.graph.inputs
    assert [dims.source(y, axis) for axis in range(4)] == [InputDim(q, 0), Const(kv_heads * group), InputDim(q, 2),
                                                           Const(dv)]
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((2, kv_heads * group, 3, dk)), "k": rng.standard_normal((2, kv_heads, 5, dk)),
             "v": rng.standard_normal((2, kv_heads, 5, dv))}
    (got,) = _run(model, {name: array.astype(np.float32) for name, array in feeds.items()})
    assert got.shape == (2, kv_heads * group, 3, dv)

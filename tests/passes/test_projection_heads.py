"""projection_heads and column_permutation: heads cut out of a fused projection, read back as heads of its columns.

Each layout below is one way a model cuts q, k and v out of one projection
``p = x @ W + b`` (Falcon: a split of the heads axis; GPT-BigCode: an
unsqueeze and a split of the columns; GPT-NeoX: q, k, v side by side per
head). Whatever the layout, head counts and head size drawn, the rewritten
layer reads ``heads(x3)`` operands and computes what it did (onnxruntime,
drawn inputs); the per-head layout's column reorder ends in the weight and
bias. Spellings that are *not* heads of the columns (a scaled q, heads
viewed without the transpose) and a projection read elsewhere are refused
or kept, with the check named.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from qgraph_passes.column_permutation import fold_column_gather
from qgraph_passes.projection_heads import read_heads_from_projections

from builders import run

K, PAST = 8, 3
LAYOUTS = ("heads-axis", "unsqueezed", "per-head")


def _i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def layer(layout: str, hq: int, hkv: int, d: int, seed: int, *, output: str = "plain", scaled_q: bool = False,
          no_transpose: bool = False, projection_read: bool = False) -> onnx.ModelProto:
    """One cached attention layer whose q, k, v are cut out of ``p = x @ W + b`` as ``layout`` does it.

    ``output``: how the heads are merged back -- "plain" (Transpose, Reshape [0, 0, H*D]), "torchscript"
    (a no-op view [0, -1, 0, D] first, then [0, 0, -1]), "batched" (through a [B*H, S, D] view of shapes read
    at run time, as a batched-heads core leaves it)."""
    rng = np.random.default_rng(seed)
    width = (hq + 2 * hkv) * d
    inits = [numpy_helper.from_array(rng.standard_normal((K, width)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b"),
             _i64("heads_axis", [2]), _i64("one", [1])]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["p"])]
    heads = [0, 2, 1, 3]
    if layout == "heads-axis":  # Falcon: view [B, S, Hq + 2 Hkv, D], split the heads axis
        inits += [_i64("view", [0, 0, hq + 2 * hkv, d]), _i64("sizes", [hq, hkv, hkv])]
        nodes += [helper.make_node("Reshape", ["p", "view"], ["viewed"]),
                  helper.make_node("Split", ["viewed", "sizes"], ["q_s", "k_s", "v_s"], axis=2)]
        nodes += [helper.make_node("Transpose", [f"{w}_s"], [f"{w}4"], perm=heads) for w in "kv"]
        q_bshd = "q_s"
    elif layout == "unsqueezed":  # GPT-BigCode: [B, 1, S, C], split the columns; q viewed as heads by shapes read
        inits += [_i64("sizes", [hq * d, d, d]), _i64("head", [-1, d])]
        nodes += [helper.make_node("Unsqueeze", ["p", "one"], ["p4"]),
                  helper.make_node("Split", ["p4", "sizes"], ["q_s", "k4", "v4"], axis=3),
                  helper.make_node("Shape", ["x"], ["bs"], start=0, end=2),
                  helper.make_node("Concat", ["bs", "head"], ["q_view"], axis=0),
                  helper.make_node("Reshape", ["q_s", "q_view"], ["q_bshd"])]
        q_bshd = "q_bshd"
    else:  # GPT-NeoX: view [B, S, H, 3 D], heads in front, split the last axis
        inits += [_i64("view", [0, 0, hq, 3 * d])]
        nodes += [helper.make_node("Reshape", ["p", "view"], ["viewed"]),
                  helper.make_node("Transpose", ["viewed"], ["bhs3d"], perm=heads),
                  helper.make_node("Split", ["bhs3d"], ["q_s", "k4", "v4"], axis=3, num_outputs=3)]
        q_bshd = None
    if q_bshd is None:
        q4 = "q_s"
    elif no_transpose:  # [B, S, H, D] read as [B, H, S, D]: positions and heads mixed, not heads
        inits.append(_i64("wrong", [0, hq, -1, d]))
        nodes.append(helper.make_node("Reshape", [q_bshd, "wrong"], ["q4"]))
        q4 = "q4"
    else:
        nodes.append(helper.make_node("Transpose", [q_bshd], ["q4"], perm=heads))
        q4 = "q4"
    if scaled_q:
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
        nodes.append(helper.make_node("Mul", [q4, "half"], ["q4_scaled"], name="q_scale"))
        q4 = "q4_scaled"
    nodes += [helper.make_node("Concat", ["past_k", "k4"], ["present_k"], axis=2),
              helper.make_node("Concat", ["past_v", "v4"], ["present_v"], axis=2),
              helper.make_node("Attention", [q4, "present_k", "present_v", "mask"], ["y"], name="attention")]
    y = "y"
    if output == "torchscript":
        inits.append(_i64("again", [0, -1, 0, d]))
        nodes.append(helper.make_node("Reshape", ["y", "again"], ["y_again"]))
        y = "y_again"
    elif output == "batched":
        inits.append(_i64("rows", [-1]))
        nodes += [helper.make_node("Shape", ["y"], ["y_sd"], start=2),
                  helper.make_node("Shape", ["y"], ["y_bh"], start=0, end=2),
                  helper.make_node("Concat", ["rows", "y_sd"], ["batched_shape"], axis=0),
                  helper.make_node("Concat", ["y_bh", "y_sd"], ["heads_shape"], axis=0),
                  helper.make_node("Reshape", ["y", "batched_shape"], ["y_batched"]),
                  helper.make_node("Reshape", ["y_batched", "heads_shape"], ["y_heads"])]
        y = "y_heads"
    inits.append(_i64("merged", [0, 0, -1] if output == "torchscript" else [0, 0, hq * d]))
    nodes += [helper.make_node("Transpose", [y], ["y_bshd"], perm=heads),
              helper.make_node("Reshape", ["y_bshd", "merged"], ["merged_heads"]),
              helper.make_node("Relu", ["merged_heads"], ["out"])]  # what reads the heads (o_proj in a model)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "present_k", "present_v")]
    if projection_read:
        nodes.append(helper.make_node("ReduceSum", ["p", "one"], ["p_sum"], keepdims=1))
        outputs.append(helper.make_tensor_value_info("p_sum", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K]),
              helper.make_tensor_value_info("past_k", TensorProto.FLOAT, ["B", hkv, "P", d]),
              helper.make_tensor_value_info("past_v", TensorProto.FLOAT, ["B", hkv, "P", d]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, "S", "T"])]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _feeds(proto: onnx.ModelProto, seed: int, batch: int = 2, length: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hkv, d = (proto.graph.input[1].type.tensor_type.shape.dim[i].dim_value for i in (1, 3))
    mask = np.where(rng.random((batch, 1, length, PAST + length)) < 0.8, 0.0, -np.inf).astype(np.float32)
    mask[..., 0] = 0.0  # every row sees a key
    return {"x": rng.standard_normal((batch, length, K)).astype(np.float32),
            "past_k": rng.standard_normal((batch, hkv, PAST, d)).astype(np.float32),
            "past_v": rng.standard_normal((batch, hkv, PAST, d)).astype(np.float32), "mask": mask}


def _rewrite(proto: onnx.ModelProto) -> tuple[ir.Model, int, list[str]]:
    model = ir.from_proto(proto)
    count, notes = read_heads_from_projections(model)
    return model, count, notes


def _is_heads(value: ir.Value) -> bool:
    node = value.producer()
    return (node.op_type == "Transpose" and list(node.attributes["perm"].value) == [0, 2, 1, 3]
            and node.inputs[0].producer().op_type == "Reshape" and len(node.inputs[0].producer().inputs[0].shape) == 3)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[str, int, int, int]:
    layout = draw(st.sampled_from(LAYOUTS))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    if layout == "unsqueezed":  # one K/V head after the query's columns
        hkv = 1
    if layout == "per-head":  # each head's q, k and v side by side: as many K/V heads as query heads
        hkv = hq
    return layout, hq, hkv, draw(st.sampled_from([2, 4, 8]))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(case=layouts(), output=st.sampled_from(["plain", "torchscript", "batched"]), seed=st.integers(0, 2**16))
def test_every_layout_is_read_as_heads_of_the_columns_and_computes_the_same(case, output, seed):
    layout, hq, hkv, d = case
    proto = layer(layout, hq, hkv, d, seed, output=output)
    model, count, notes = _rewrite(proto)
    assert count == 1, notes
    attention = next(n for n in model.graph if n.op_type == "Attention")
    k_new, v_new = (attention.inputs[i].producer().inputs[1] for i in (1, 2))
    assert all(_is_heads(t) for t in (attention.inputs[0], k_new, v_new))
    # the output's data: one Transpose, then a Reshape to the constant [0, 0, Hq * D]
    (transpose,) = [u.node for u in attention.outputs[0].uses() if u.node.op_type != "Shape"]
    (reshape,) = [u.node for u in transpose.outputs[0].uses()]
    target = ir.convenience.get_const_tensor(reshape.inputs[1])
    assert transpose.op_type == "Transpose" and target is not None and target.numpy().tolist() == [0, 0, hq * d]
    assert ("the output merged" in notes[0]) == (output != "plain")
    if layout == "per-head" and hq > 1:  # the reorder went into the weight and bias: no Gather of activations left
        assert "in its weights" in notes[0] and not [n for n in model.graph if n.op_type == "Gather"]
    for feed_seed in (0, 1):
        feeds = _feeds(proto, seed + feed_seed, batch=1 + feed_seed, length=2 + feed_seed)
        expected, got = run(proto, feeds), run(model, feeds)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_layer_already_in_heads_form_is_left_alone():
    proto = layer("heads-axis", 4, 1, 4, 0)
    model, count, _ = _rewrite(proto)
    assert count == 1
    again, notes = read_heads_from_projections(model)
    assert again == 0 and not notes


def test_a_scaled_query_is_not_a_data_movement_and_the_layer_is_kept():
    proto = layer("heads-axis", 4, 1, 4, 0, scaled_q=True)
    model, count, notes = _rewrite(proto)
    assert count == 0 and len(notes) == 1
    assert "Mul 'q_scale'" in notes[0] and "does more than move elements" in notes[0]
    assert len(list(model.graph)) == len(proto.graph.node)


def test_heads_viewed_without_their_transpose_are_refused():
    """Reshape [B, S, H, D] -> [B, H, S, D] (no Transpose) mixes positions into heads: not heads of the columns."""
    proto = layer("heads-axis", 4, 1, 4, 0, no_transpose=True)
    model, count, notes = _rewrite(proto)
    assert count == 0 and "mixes the batch or sequence positions" in notes[0], notes
    assert len(list(model.graph)) == len(proto.graph.node)


def test_a_projection_read_elsewhere_keeps_its_reorder_as_a_gather():
    """The per-head reorder cannot go into the weights when the projection's columns are read by something else:
    it stays a Gather, the note says why, and the layer computes the same (the other reader too)."""
    proto = layer("per-head", 2, 2, 4, 0, projection_read=True)
    model, count, notes = _rewrite(proto)
    assert count == 1 and "by a Gather (kept: 'p' is read outside the projection's heads)" in notes[0], notes
    assert [n.op_type for n in model.graph].count("Gather") == 1
    feeds = _feeds(proto, 3)
    expected, got = run(proto, feeds), run(model, feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


# -- column_permutation on its own ------------------------------------------------------------------------


def _projection(perm: np.ndarray, packed: int, seed: int, *, biased: bool, segment_read: bool,
                mine_first: bool = True) -> onnx.ModelProto:
    """``Gather(Split(x @ [W | U])[0] (+ b), perm)``, U's columns (``packed`` of them) a second output
    (``mine_first=False``: ``x @ [U | W]``, the reordered columns second)."""
    rng = np.random.default_rng(seed)
    width = len(perm)
    inits = [numpy_helper.from_array(rng.standard_normal((K, width + packed)).astype(np.float32), "WU"),
             numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b"),
             _i64("sizes", [width, packed] if mine_first else [packed, width]), _i64("perm", perm)]
    parts = ["mine", "theirs"] if mine_first else ["theirs", "mine"]
    nodes = [helper.make_node("MatMul", ["x", "WU"], ["xw"]),
             helper.make_node("Split", ["xw", "sizes"], parts, axis=-1)]
    mine = "mine"
    if biased:
        nodes.append(helper.make_node("Add", ["b", "mine"], ["biased"]))
        mine = "biased"
    nodes += [helper.make_node("Gather", [mine, "perm"], ["reordered"], axis=-1, name="reorder"),
              helper.make_node("Relu", ["reordered"], ["out"])]
    outputs = ["out", "theirs", *(["mine"] if segment_read else [])]
    graph = helper.make_graph(nodes, "projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data(), width=st.integers(2, 12), packed=st.integers(1, 5), biased=st.booleans(),
       mine_first=st.booleans())
def test_a_column_reorder_folds_into_the_weights_exactly(data, width, packed, biased, mine_first):
    perm = np.array(data.draw(st.permutations(range(width))), np.int64)
    proto = _projection(perm, packed, width, biased=biased, segment_read=False, mine_first=mine_first)
    model = ir.from_proto(proto)
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert fold_column_gather(model.graph, gather) is None
    assert "Gather" not in [n.op_type for n in model.graph]
    feeds = {"x": np.random.default_rng(width).standard_normal((3, K)).astype(np.float32)}
    expected, got = run(proto, feeds), run(model, feeds)
    for name, value in expected.items():  # the packed sibling's columns ("theirs") are untouched
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_reorder_of_columns_read_elsewhere_is_not_folded():
    proto = _projection(np.array([2, 0, 1], np.int64), 2, 0, biased=False, segment_read=True)
    model = ir.from_proto(proto)
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert fold_column_gather(model.graph, gather) == "'mine' is read outside the projection's heads"
    assert [n.op_type for n in model.graph].count("Gather") == 1

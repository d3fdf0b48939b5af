"""rotary, interleaved form: rotate_every_two in any element-moving spelling fuses to RotaryEmbedding(interleaved=1).

The graphs are built the way exporters write GPT-J's and CodeGen's rotary
(strided slices + stack + flatten, or a view as pairs + split), with the
tables repeated in pairs by Tile, Expand or Concat, in both layouts
([B, S, H, D] as GPT-J rotates, [B, H, S, D] after the head transpose),
full or partial. Each case is checked against onnxruntime; the negative
cases break one fact the fusion relies on and must be refused and reported.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qgraph

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
INT64_MAX = np.iinfo(np.int64).max


@st.composite
def interleaved_cases(draw) -> dict:
    d = draw(st.sampled_from([4, 8, 16]))
    return {
        "heads": draw(st.integers(1, 3)),
        "d": d,
        "rot": draw(st.sampled_from([None, None, d // 2])) if d >= 8 else None,  # GPT-J: only the first r turn
        "layout": draw(st.sampled_from(["BSHD", "BHSD"])),
        "pairing": draw(st.sampled_from(["stack", "split"])),  # strided slices + stack, or a view as pairs + Split
        "flatten_shape": draw(st.sampled_from(["constant", "computed"])),  # Reshape target written or from Shape
        "table_repeat": draw(st.sampled_from(["tile", "expand", "concat"])),
        "table_batch": draw(st.sampled_from(["B", 1])),
        "swap_mul": draw(st.booleans()),
        "swap_add": draw(st.booleans()),
        "break": None,  # the negative tests set one of: sign, pairs, halves, mul
    }


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, values, dtype=np.int64) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, outputs: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(stem or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"n_{op_type}"), **attrs))
        return outs[0] if outputs == 1 else outs


def _flatten_pairs(g: _Graph, case: dict, stacked: str, like: str) -> str:
    """[..., n, 2] -> [..., 2n], the Reshape target written out or computed from a Shape, as the exporters do."""
    if case["flatten_shape"] == "constant":
        return g.op("Reshape", [stacked, g.const([0, 0, 0, -1])])
    lead = g.op("Shape", [like], start=0, end=3)
    return g.op("Reshape", [stacked, g.op("Concat", [lead, g.const([-1])], axis=0)])


def _every_two(g: _Graph, case: dict, x: str) -> str:
    """rotated[..., 2i] = -x[..., 2i+1], rotated[..., 2i+1] = x[..., 2i] (or a broken variant)."""
    if case["pairing"] == "stack":
        evens = g.op("Slice", [x, g.const([0]), g.const([INT64_MAX]), g.const([-1]), g.const([2])])
        if case["break"] == "pairs":  # x[..., ::-2]: the odd channels backwards, so 2i meets D-1-2i
            odds = g.op("Slice", [x, g.const([-1]), g.const([-INT64_MAX]), g.const([-1]), g.const([-2])])
        else:
            odds = g.op("Slice", [x, g.const([1]), g.const([INT64_MAX]), g.const([-1]), g.const([2])])
        first, second = odds, evens
        columns = [g.op("Unsqueeze", [v, g.const([-1])]) for v in (first, second)]
    else:
        pairs = g.op("Reshape", [x, g.const([0, 0, 0, -1, 2])])
        a, b = g.op("Split", [pairs, g.const([1, 1])], axis=-1, outputs=2)
        columns = [b, a]
    if case["break"] == "sign":  # stack((x2, -x1)): the rotation by -theta
        columns = [columns[0], g.op("Neg", [columns[1]])]
    elif case["break"] == "mul":  # -x2 written as x2 * -1: arithmetic, not an element move
        columns = [g.op("Mul", [columns[0], g.const(-1.0, np.float32)]), columns[1]]
    else:
        columns = [g.op("Neg", [columns[0]]), columns[1]]
    stacked = g.op("Concat", columns, axis=-1)
    return _flatten_pairs(g, case, stacked, x)


def _paired_table(g: _Graph, case: dict, trig: str, rot: int) -> str:
    """trig(repeat_interleave(freqs, 2, -1)) with a head axis: [Bt, S, 1, r] or [Bt, 1, S, r]."""
    if case["break"] == "halves":  # cat((freqs, freqs)): the half-rotation table, not pairs
        emb = g.op("Concat", ["freqs", "freqs"], axis=-1)
    else:
        column = g.op("Unsqueeze", ["freqs", g.const([-1])])
        repeat = case["table_repeat"]
        if repeat == "tile":
            pairs = g.op("Tile", [column, g.const([1, 1, 1, 2])])
        elif repeat == "expand":
            pairs = g.op("Expand", [column, g.const([1, 1, 1, 2])])
        else:
            pairs = g.op("Concat", [column, column], axis=-1)
        emb = g.op("Reshape", [pairs, g.const([0, 0, rot])])
    table = g.op(trig, [emb])
    return g.op("Unsqueeze", [table, g.const([2 if case["layout"] == "BSHD" else 1])])


def build(case: dict) -> onnx.ModelProto:
    """y = x * cos + rotate_every_two(x) * sin on the first r channels (all of them by default)."""
    d, rot = case["d"], case["rot"] or case["d"]
    g = _Graph()
    x = "x"
    if case["rot"] is not None:
        x = g.op("Slice", ["x", g.const([0]), g.const([rot]), g.const([-1])], stem="x_rot")
        x_pass = g.op("Slice", ["x", g.const([rot]), g.const([INT64_MAX]), g.const([-1])], stem="x_pass")
    cos, sin = _paired_table(g, case, "Cos", rot), _paired_table(g, case, "Sin", rot)
    rotated = _every_two(g, case, x)

    def mul(a, b):
        return g.op("Mul", [b, a] if case["swap_mul"] else [a, b])

    a, b = mul(x, cos), mul(rotated, sin)
    heads_after = case.get("heads_after")  # the model's own transpose after rotating [B, S, H, D] (GPT-J)
    y = "y_bshd" if heads_after else "y"
    out = y if case["rot"] is None else "y_rot"
    g.nodes.append(helper.make_node("Add", [b, a] if case["swap_add"] else [a, b], [out], name="the_rotary_add"))
    if case["rot"] is not None:
        g.nodes.append(helper.make_node("Concat", ["y_rot", x_pass], [y], axis=-1, name="n_pass_concat"))
    heads, bt = case["heads"], case["table_batch"]
    x_dims = ["B", "S", heads, d] if case["layout"] == "BSHD" else ["B", heads, "S", d]
    y_dims = x_dims
    if heads_after:
        g.nodes.append(helper.make_node("Transpose", [y], ["y"], perm=heads_after, name="n_model_transpose"))
        y_dims = [x_dims[axis] for axis in heads_after]
    graph = helper.make_graph(
        g.nodes, "interleaved_rotary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims),
         helper.make_tensor_value_info("freqs", TensorProto.FLOAT, [bt, "S", rot // 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_dims)], g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


@SETTINGS
@given(case=interleaved_cases(), data=st.data())
def test_every_spelling_of_rotate_every_two_fuses_to_one_interleaved_rotary_embedding(case, data):
    proto = build(case)
    fused, report = qgraph.optimize_with_report(ir.from_proto(proto), ["rotary"])
    ops = [n.op_type for n in fused.graph]
    assert ops.count("RotaryEmbedding") == 1, (ops, report.passes[-1].notes)
    assert "Neg" not in ops and "Add" not in ops and "Mul" not in ops  # nothing of the spelled-out rotation is left
    node = next(n for n in fused.graph if n.op_type == "RotaryEmbedding")
    assert node.attributes["interleaved"].value == 1
    dim = node.attributes.get("rotary_embedding_dim")
    assert (dim.value if dim is not None else 0) == (case["rot"] or 0)
    assert_equivalent(proto, fused, examples=4, rtol=1e-5, atol=1e-5, data=data)


@pytest.mark.parametrize("broken, reason", [
    # stack((x2, -x1)) turns by -theta: the pairing read on the probe is not rotate_every_two, channel by channel
    ("sign", "is not rotate_every_two of 'x': its channels hold x[1], -x[0], x[3], -x[2]"),
    # channel 2i paired with D-1-2i: the probe shows which channel each one holds
    ("pairs", "its channels hold -x[7], x[0], -x[5], x[2]"),
    # cos(cat(f, f)) is a half-rotation table: entry 2i is not entry 2i+1
    ("halves", "entries are not known to come in pairs"),
    # x2 * -1 computes instead of moving elements: the pairing is not proven, the op is named
    ("mul", "which does more than move elements"),
])
@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
def test_a_broken_interleaved_rotation_is_refused_and_the_failed_check_is_reported(broken, reason, layout):
    case = {"heads": 2, "d": 8, "rot": None, "layout": layout, "pairing": "stack", "flatten_shape": "constant",
            "table_repeat": "tile", "table_batch": "B", "swap_mul": False, "swap_add": False, "break": None}
    fused, _ = qgraph.optimize_with_report(ir.from_proto(build(case)), ["rotary"])
    assert [n.op_type for n in fused.graph].count("RotaryEmbedding") == 1  # unbroken, the same graph fuses
    kept, report = qgraph.optimize_with_report(ir.from_proto(build({**case, "break": broken})), ["rotary"])
    assert "RotaryEmbedding" not in [n.op_type for n in kept.graph]
    notes = report.passes[-1].notes
    assert any("candidate 'the_rotary_add' not fused" in n and reason in n for n in notes), notes


def test_a_rotation_whose_product_is_read_elsewhere_is_kept_and_reported():
    """The rule replaces the two products with the fused node: one read by something else cannot go."""
    case = {"heads": 2, "d": 8, "rot": None, "layout": "BSHD", "pairing": "stack", "flatten_shape": "constant",
            "table_repeat": "tile", "table_batch": "B", "swap_mul": False, "swap_add": False, "break": None}
    proto = build(case)
    product = next(n for n in proto.graph.node if n.op_type == "Mul" and "x" in n.input).output[0]
    proto.graph.output.append(helper.make_tensor_value_info(product, TensorProto.FLOAT, None))
    kept, report = qgraph.optimize_with_report(ir.from_proto(proto), ["rotary"])
    assert "RotaryEmbedding" not in [n.op_type for n in kept.graph]
    notes = report.passes[-1].notes
    assert any("'the_rotary_add' not fused" in n and f"the product '{product}' is also read" in n for n in notes), notes


@settings(max_examples=10, deadline=None, derandomize=True)
@given(case=interleaved_cases(), heads_after=st.sampled_from([[0, 2, 1, 3], [0, 2, 3, 1]]), data=st.data())
def test_the_transpose_back_merges_with_the_models_own_transpose(case, heads_after, data):
    """GPT-J permutes q (and k, or k straight to [B, H, D, S]) right after rotating [B, S, H, D]."""
    case = {**case, "layout": "BSHD", "heads_after": heads_after}
    proto = build(case)
    fused, report = qgraph.optimize_with_report(ir.from_proto(proto), ["rotary"])
    transposes = [n for n in fused.graph if n.op_type == "Transpose"]
    rotary = next(n for n in fused.graph if n.op_type == "RotaryEmbedding")
    assert report.passes[-1].rule_matches.get("rotary-heads-back") == 1
    # one transpose into RotaryEmbedding; after it, none ([0, 2, 1, 3] cancels) or one ([B, H, D, S])
    assert len(transposes) == (1 if heads_after == [0, 2, 1, 3] else 2)
    after = [u.op_type for u, _ in rotary.outputs[0].uses() if u.op_type == "Transpose"]
    assert after == (["Transpose"] if heads_after == [0, 2, 3, 1] else [])  # (an Identity keeps the output's name)
    assert_equivalent(proto, fused, examples=4, rtol=1e-5, atol=1e-5, data=data)

"""rotary: the half-rotation rotary embedding, as exporters spell it, fuses to one RotaryEmbedding with the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from qgraph_passes.rotary import RULES, RotaryFusionPass

import qgraph
from qgraph.verify.rule_check import check_rule

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
INT64_MAX = np.iinfo(np.int64).max


@st.composite
def rotary_cases(draw) -> dict:
    d = draw(st.sampled_from([4, 8, 16]))
    return {
        "heads": draw(st.integers(1, 3)),
        "d": d,
        # partial: only the first `rot` channels turn (Phi); None: all of them
        "rot": draw(st.sampled_from([None, None, d // 2])) if d >= 8 else None,
        "steps": draw(st.booleans()),  # Slice with or without its steps input
        "hi_end": draw(st.sampled_from(["max", "exact"])),  # x[..., h:] as INT64_MAX (torch) or the dim
        "cat_axis": draw(st.sampled_from([-1, 3])),
        "swap_mul": draw(st.booleans()),
        "swap_add": draw(st.booleans()),
        "table_batch": draw(st.sampled_from(["B", 1])),  # one table row per batch row, or shared
        "table_cast": draw(st.booleans()),  # cos(emb).to(dtype) as the dynamo export spells it
        # the half as TorchScript writes x.shape[-1] // 2: Unsqueeze(Div(Gather(Shape(x), 3), 2))
        "computed_half": draw(st.booleans()),
        "equal_halves": True,
    }


def build(case: dict) -> onnx.ModelProto:
    """q_embed = x * cos + rotate_half(x) * sin with the tables cos/sin(cat(freqs, freqs)) made in the graph."""
    d, rot = case["d"], case["rot"] or case["d"]
    half = rot // 2
    nodes, inits = [], []

    def const(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def half_of(src, out):
        """src.shape[-1] // 2 as a 1-D tensor, computed in the graph."""
        nodes.append(helper.make_node("Shape", [src], [f"{out}_shape"]))
        inits.append(numpy_helper.from_array(np.array(3, np.int64), f"{out}_three"))
        inits.append(numpy_helper.from_array(np.array(2, np.int64), f"{out}_two"))
        nodes.append(helper.make_node("Gather", [f"{out}_shape", f"{out}_three"], [f"{out}_dim"], axis=0))
        nodes.append(helper.make_node("Div", [f"{out}_dim", f"{out}_two"], [f"{out}_half"]))
        nodes.append(helper.make_node("Unsqueeze", [f"{out}_half", const(f"{out}_ax0", [0])], [out]))
        return out

    def bound(src, value, out):
        if case["computed_half"] and value == half and src == x:
            return half_of(src, out)
        return const(out, [value])

    def slice_(src, start, end, out):
        ins = [src, bound(src, start, f"{out}_s"), bound(src, end, f"{out}_e"), const(f"{out}_a", [-1])]
        if case["steps"]:
            ins.append(const(f"{out}_st", [1]))
        nodes.append(helper.make_node("Slice", ins, [out]))
        return out

    def mul(a, b, out):
        nodes.append(helper.make_node("Mul", [b, a] if case["swap_mul"] else [a, b], [out]))
        return out

    # tables: [Bt, S, half] frequencies -> [Bt, 1, S, rot] with equal halves (or not, for the negative test)
    second = "freqs" if case["equal_halves"] else "other"
    nodes.append(helper.make_node("Concat", ["freqs", second], ["emb"], axis=-1))
    for trig in ("Cos", "Sin"):
        t = trig.lower()
        nodes.append(helper.make_node(trig, ["emb"], [f"{t}_raw"]))
        src = f"{t}_raw"
        if case["table_cast"]:
            nodes.append(helper.make_node("Cast", [src], [f"{t}_cast"], to=TensorProto.FLOAT))
            src = f"{t}_cast"
        nodes.append(helper.make_node("Unsqueeze", [src, const(f"{t}_ax", [1])], [t]))
    x = "x"
    if case["rot"] is not None:
        x = slice_("x", 0, rot, "x_rot")
        slice_("x", rot, INT64_MAX, "x_pass")
    hi_end = INT64_MAX if case["hi_end"] == "max" else rot
    slice_(x, half, hi_end, "x_hi")
    slice_(x, 0, half, "x_lo")
    nodes.append(helper.make_node("Neg", ["x_hi"], ["neg_hi"]))
    nodes.append(helper.make_node("Concat", ["neg_hi", "x_lo"], ["rotated"], axis=case["cat_axis"]))
    a, b = mul(x, "cos", "x_cos"), mul("rotated", "sin", "rot_sin")
    roped = "y" if case["rot"] is None else "y_rot"
    nodes.append(helper.make_node("Add", [b, a] if case["swap_add"] else [a, b], [roped]))
    if case["rot"] is not None:
        nodes.append(helper.make_node("Concat", ["y_rot", "x_pass"], ["y"], axis=-1))
    bt = case["table_batch"]
    graph = helper.make_graph(
        nodes, "rotary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", case["heads"], "S", d]),
         helper.make_tensor_value_info("freqs", TensorProto.FLOAT, [bt, "S", half]),
         helper.make_tensor_value_info("other", TensorProto.FLOAT, [bt, "S", half])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", case["heads"], "S", d])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


@SETTINGS
@given(case=rotary_cases(), data=st.data())
def test_every_spelling_fuses_to_one_rotary_embedding_with_the_same_outputs(case, data):
    proto = build(case)
    fused, report = qgraph.optimize_with_report(ir.from_proto(proto), ["rotary"])
    ops = [n.op_type for n in fused.graph]
    assert ops.count("RotaryEmbedding") == 1, (ops, report.passes[-1].notes)
    # nothing of the spelled-out rotation is left: no Neg, no rotate_half Concat
    assert "Neg" not in ops and "Add" not in ops
    rotary = next(n for n in fused.graph if n.op_type == "RotaryEmbedding")
    dim = rotary.attributes.get("rotary_embedding_dim")
    assert (dim.value if dim is not None else 0) == (case["rot"] or 0)
    assert_equivalent(proto, fused, examples=4, rtol=1e-5, atol=1e-5, data=data)


@SETTINGS
@given(case=rotary_cases())
def test_a_table_whose_halves_differ_is_not_fused_and_the_reason_is_reported(case):
    case = {**case, "equal_halves": False, "rot": None}
    fused, report = qgraph.optimize_with_report(ir.from_proto(build(case)), ["rotary"])
    assert "RotaryEmbedding" not in [n.op_type for n in fused.graph]
    notes = report.passes[-1].notes
    assert any("halves are not known to be equal" in n for n in notes), notes


@pytest.mark.parametrize("change, reason", [
    # rotate_half with the halves in the other order is a rotation by -theta: not what RotaryEmbedding computes
    (lambda t: t.replace('(neg_hi, x_lo)', '(x_lo, neg_hi)'), "Neg"),
    (lambda t: t.replace("<value_ints = [4]>", "<value_ints = [3]>"), "not [4:8]"),
])
def test_a_rotation_that_is_not_rotate_half_is_left_alone(change, reason):
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[B, 2, S, 8] x, float[B, S, 4] freqs) => (float[B, 2, S, 8] y) {
        emb = Concat <axis = -1> (freqs, freqs)
        c = Cos(emb)
        s = Sin(emb)
        ax = Constant <value_ints = [1]> ()
        cos = Unsqueeze(c, ax)
        sin = Unsqueeze(s, ax)
        zero = Constant <value_ints = [0]> ()
        h = Constant <value_ints = [4]> ()
        big = Constant <value_ints = [8]> ()
        last = Constant <value_ints = [-1]> ()
        x_hi = Slice(x, h, big, last)
        x_lo = Slice(x, zero, h, last)
        neg_hi = Neg(x_hi)
        rotated = Concat <axis = -1> (neg_hi, x_lo)
        x_cos = Mul(x, cos)
        rot_sin = Mul(rotated, sin)
        y = Add(x_cos, rot_sin)
    }
    """
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    fused, report = qgraph.optimize_with_report(ir.from_proto(proto), ["rotary"])
    assert "RotaryEmbedding" in [n.op_type for n in fused.graph]  # the text as written does fuse
    changed = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(change(text)))
    kept, report = qgraph.optimize_with_report(ir.from_proto(changed), ["rotary"])
    assert "RotaryEmbedding" not in [n.op_type for n in kept.graph]
    assert any(reason in n for n in report.passes[-1].notes), report.passes[-1].notes


@pytest.mark.parametrize("rule", RULES.rules, ids=lambda r: r.name)
def test_each_rule_holds_on_its_own(rule):
    result = check_rule(rule, examples=2)
    assert result.ok, str(result)


def test_the_pass_is_registered_with_its_docstring():
    from qgraph.registry import default_registry

    assert default_registry().get("rotary") is RotaryFusionPass
    assert RotaryFusionPass.__doc__.startswith("Fuse rotary position embedding")

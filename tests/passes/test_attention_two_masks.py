"""GPT-Neo's two masks: Where(causal, scores, fill) then + the padding mask, fused into one mask input."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from builders import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from qgraph_passes.attention import AttentionFusionPass

MIN = float(np.finfo(np.float32).min)


def _build(heads: int, scale: float | None, fill: float, padding_fill: float) -> onnx.ModelProto:
    c = lambda name, value, dtype=np.float32: onnx.numpy_helper.from_array(np.asarray(value, dtype), name)  # noqa: E731
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], name=f"/h.0/attn/{out}", **kw)  # noqa: E731
    scaled = "qk" if scale is None else "scaled"
    nodes = [
        n("Transpose", ["K"], "kt", perm=[0, 1, 3, 2]),
        n("MatMul", ["Q", "kt"], "qk"),
        *([] if scale is None else [n("Mul", ["qk", "scale"], "scaled")]),
        n("Where", ["causal", scaled, "fill"], "causal_masked"),
        n("Cast", ["attention_mask"], "pad_keep", to=TensorProto.BOOL),
        n("Unsqueeze", ["pad_keep", "axes"], "pad_keep4"),
        n("Where", ["pad_keep4", "zero", "padding_fill"], "padding"),
        n("Add", ["causal_masked", "padding"], "masked"),
        n("Softmax", ["masked"], "probs", axis=-1),
        n("MatMul", ["probs", "V"], "Y"),
    ]
    inits = [c("scale", scale or 1.0), c("fill", fill), c("zero", 0.0), c("padding_fill", padding_fill),
             c("axes", [1, 2], np.int64)]
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("Q", f, ["B", heads, "S", 4]),
        helper.make_tensor_value_info("K", f, ["B", heads, "T", 4]),
        helper.make_tensor_value_info("V", f, ["B", heads, "T", 4]),
        helper.make_tensor_value_info("causal", TensorProto.BOOL, [1, 1, "S", "T"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
    ]
    graph = helper.make_graph(nodes, "neo", inputs, [helper.make_tensor_value_info("Y", f, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from([1, 2]), scale=st.sampled_from([None, 0.5]), fill=st.sampled_from([MIN, -np.inf, -1.0]),
       padding_fill=st.sampled_from([MIN, -np.inf]), data=st.data())
def test_causal_where_then_padding_add_fuses_into_one_mask_and_means_the_same(heads, scale, fill, padding_fill, data):
    proto = _build(heads, scale, fill, padding_fill)
    model = ir.from_proto(proto)
    fusion = AttentionFusionPass()
    fusion(model)
    attention = [x for x in model.graph if x.op_type == "Attention"]
    if fill == -1.0:  # not a masking value: the Where is part of the computation, not a mask
        assert attention == [] and any("not a large negative value" in note for note in fusion.report.notes)
    else:
        assert len(attention) == 1 and "Softmax" not in [x.op_type for x in model.graph]
        assert attention[0].inputs[3].dtype == ir.DataType.FLOAT
    b, s, t = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    floats = st.floats(-3, 3, width=32, allow_subnormal=False)
    feed = {
        "Q": data.draw(hnp.arrays(np.float32, (b, heads, s, 4), elements=floats)),
        "K": data.draw(hnp.arrays(np.float32, (b, heads, t, 4), elements=floats)),
        "V": data.draw(hnp.arrays(np.float32, (b, heads, t, 4), elements=floats)),
        "causal": data.draw(hnp.arrays(np.bool_, (1, 1, s, t))),
        "attention_mask": data.draw(hnp.arrays(np.int64, (b, t), elements=st.integers(0, 1))),
    }
    expected, actual = run(proto, feed)["Y"], run(ir.to_proto(model), feed)["Y"]
    finite = ~np.isnan(expected)
    assert not np.isnan(actual[finite]).any()
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-4, atol=1e-5)


def test_rows_hidden_by_both_masks_and_by_one_keep_their_weights():
    """finfo.min + finfo.min is -inf: such keys get no weight, keys hidden once share it uniformly."""
    proto = _build(1, None, MIN, MIN)
    model = ir.from_proto(proto)
    AttentionFusionPass()(model)
    rng = np.random.default_rng(0)
    feed = {"Q": rng.normal(size=(1, 1, 1, 4)).astype(np.float32), "K": rng.normal(size=(1, 1, 3, 4)).astype(np.float32),
            "V": rng.normal(size=(1, 1, 3, 4)).astype(np.float32),
            "causal": np.array([[[[True, False, False]]]]), "attention_mask": np.array([[0, 0, 1]], np.int64)}
    expected = run(proto, feed)["Y"]
    # key 0: hidden by padding only, key 1: by both (-inf), key 2: by the causal Where only
    np.testing.assert_allclose(expected[0, 0, 0], feed["V"][0, 0, [0, 2]].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(run(ir.to_proto(model), feed)["Y"], expected, rtol=1e-5, atol=1e-6)

"""lower-gqa's rule for which rotations GroupQueryAttention turns itself, checked against onnxruntime.

``kernel_rotary_reason`` decides whether a layer's rotations go into the
kernel (``do_rotary``) or stay RotaryEmbedding nodes in front of it. Heads
of 8 to 128 channels turning 8 to all of them are drawn; every pair the rule
accepts, in either form (halves or interleaved pairs), must make
onnxruntime's CPU kernel rotate q and k exactly as ONNX's RotaryEmbedding
does -- the first ``rotary_dim`` channels turned by the cache's rows at each
token's position, the rest of the head kept -- and attend with the turned q
and k. A rule that accepted a pair the kernel refuses fails here. The zoo's
layers exercise only 16 of 32 channels (Phi, GPT-J) and whole heads of 16;
real models turn 16 to 64 channels of heads of 64 to 256.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from qgraph_passes.gqa_lowering import kernel_rotary_reason

ROWS = 32  # rows of the cos/sin caches: positions 0..31


def _session(nodes, inputs, outputs) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _rotate(x: np.ndarray, heads: int, rotary_dim: int, interleaved: int, cos, sin, positions) -> np.ndarray:
    """ONNX RotaryEmbedding (opset 23) as onnxruntime runs it: the reference the kernel must match."""
    attributes = {"num_heads": heads, "interleaved": interleaved, "rotary_embedding_dim": rotary_dim}
    session = _session([helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "positions"], ["y"], **attributes)],
                       [_float("x", x.shape), _float("cos", cos.shape), _float("sin", sin.shape),
                        helper.make_tensor_value_info("positions", TensorProto.INT64, positions.shape)],
                       [_float("y", None)])
    return session.run(None, {"x": x, "cos": cos, "sin": sin, "positions": positions})[0]


@st.composite
def _layers(draw):
    head_dim = 8 * draw(st.integers(1, 16))  # multiples of 8: half of them are sizes the rule refuses
    rotary_dim = 8 * draw(st.integers(1, head_dim // 8))
    kv_heads = draw(st.integers(1, 2))
    return dict(head_dim=head_dim, rotary_dim=rotary_dim, interleaved=draw(st.integers(0, 1)), kv_heads=kv_heads,
                heads=kv_heads * draw(st.integers(1, 2)), seq=draw(st.integers(1, 6)), start=draw(st.integers(0, 20)),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(_layers())
def test_every_rotation_the_rule_accepts_is_the_kernels(layer) -> None:
    d, r, hq, hkv, s = layer["head_dim"], layer["rotary_dim"], layer["heads"], layer["kv_heads"], layer["seq"]
    assume(kernel_rotary_reason(d, r) is None)  # a rule that accepted more would meet the kernel's refusal here
    rng = np.random.default_rng(layer["seed"])
    q, k, v = (rng.standard_normal((1, s, h * d), dtype=np.float32) for h in (hq, hkv, hkv))
    angles = np.arange(ROWS)[:, None] * rng.uniform(0.01, 1.0, r // 2)[None]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    positions = (layer["start"] + np.arange(s, dtype=np.int64))[None]
    # a first prompt whose tokens sit at positions start.. (as a chunk after a past does): the kernel reads them
    # from position_ids, as lower-gqa passes them
    attributes = {"num_heads": hq, "kv_num_heads": hkv, "do_rotary": 1, "rotary_interleaved": layer["interleaved"]}
    operands = ["q", "k", "v", "", "", "seqlens_k", "total", "cos", "sin", "positions"]
    gqa = helper.make_node("GroupQueryAttention", operands, ["y", "present_k", "present_v"], domain="com.microsoft",
                           **attributes)
    session = _session([gqa], [_float("q", q.shape), _float("k", k.shape), _float("v", v.shape),
                               helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                               helper.make_tensor_value_info("total", TensorProto.INT32, []),
                               _float("cos", cos.shape), _float("sin", sin.shape),
                               helper.make_tensor_value_info("positions", TensorProto.INT64, positions.shape)],
                       [_float(n, None) for n in ("y", "present_k", "present_v")])
    y, present_k, _ = session.run(None, {"q": q, "k": k, "v": v, "seqlens_k": np.array([s - 1], np.int32),
                                         "total": np.array(s, np.int32), "cos": cos, "sin": sin,
                                         "positions": positions})
    q_turned = _rotate(q, hq, r, layer["interleaved"], cos, sin, positions).reshape(s, hq, d).transpose(1, 0, 2)
    k_turned = _rotate(k, hkv, r, layer["interleaved"], cos, sin, positions).reshape(s, hkv, d).transpose(1, 0, 2)
    np.testing.assert_allclose(present_k[0], k_turned, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(present_k[0][..., r:], k.reshape(s, hkv, d).transpose(1, 0, 2)[..., r:])
    # the attention on the turned q and k: causal, each query head reading its group's K/V head
    keys = np.repeat(k_turned, hq // hkv, axis=0)
    values = np.repeat(v.reshape(s, hkv, d).transpose(1, 0, 2), hq // hkv, axis=0)
    scores = q_turned @ keys.transpose(0, 2, 1) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)) @ values
    np.testing.assert_allclose(y[0].reshape(s, hq, d).transpose(1, 0, 2), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("head_dim", "rotary_dim", "why"), [
    (24, 24, "head size 24"),          # heads of 16s only
    (16, 8, "rotary_embedding_dim 8 of 16"),  # the tiny zoo's Phi before it had heads of 32
    (64, 20, "rotary_embedding_dim 20 of 64"),  # Pythia-2.8B's rotary_pct 0.25 of 80 is 20: also refused
    (32, 48, "rotary_embedding_dim 48 of 32"),
])
def test_the_rule_refuses_what_the_kernel_cannot_turn(head_dim, rotary_dim, why) -> None:
    reason = kernel_rotary_reason(head_dim, rotary_dim)
    assert reason is not None and why in reason

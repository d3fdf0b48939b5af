"""Small hand-made graphs, their correct rewrites and their seeded mutants.

Each builder returns an ``onnx.ModelProto`` (the tests convert as they need).
Node names are stable across a model and its mutants, so a test can assert
which node the localizer blames. Mutants change one thing the way a wrong
pass would: an epsilon, an axis, a weight column, a mask comparison, a cache
write index.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper

OPSET = 23
HIDDEN = 8


def _model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _weight(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


# --- RMSNorm ------------------------------------------------------------------


def rms_norm(epsilon: float = 1e-6) -> onnx.ModelProto:
    """RMSNorm as exporters write it: Pow, ReduceMean, Add(eps), Sqrt, Div, Mul(weight); then a projection."""
    nodes = [
        oh.make_node("Pow", ["x", "two"], ["rms/x2"], name="rms/pow"),
        oh.make_node("ReduceMean", ["rms/x2", "axes"], ["rms/mean"], name="rms/mean", keepdims=1),
        oh.make_node("Add", ["rms/mean", "eps"], ["rms/mean_eps"], name="rms/add_eps"),
        oh.make_node("Sqrt", ["rms/mean_eps"], ["rms/rms"], name="rms/sqrt"),
        oh.make_node("Div", ["x", "rms/rms"], ["rms/normed"], name="rms/div"),
        oh.make_node("Mul", ["rms/normed", "rms_weight"], ["rms/out"], name="rms/mul_weight"),
        oh.make_node("MatMul", ["rms/out", "proj"], ["y"], name="proj/matmul"),
    ]
    inits = [
        _init("two", np.array(2.0, np.float32)),
        _init("axes", np.array([-1], np.int64)),
        _init("eps", np.array(epsilon, np.float32)),
        _init("rms_weight", 1.0 + _weight((HIDDEN,), 1)),
        _init("proj", _weight((HIDDEN, HIDDEN), 2)),
    ]
    x = oh.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", HIDDEN])
    y = oh.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", HIDDEN])
    return _model(nodes, [x], [y], inits)


def rms_norm_fused(epsilon: float = 1e-6) -> onnx.ModelProto:
    """The same block with the opset-23 ``RMSNormalization`` op, output name kept."""
    nodes = [
        oh.make_node(
            "RMSNormalization", ["x", "rms_weight"], ["rms/out"], name="rms/fused", epsilon=epsilon, axis=-1
        ),
        oh.make_node("MatMul", ["rms/out", "proj"], ["y"], name="proj/matmul"),
    ]
    inits = [_init("rms_weight", 1.0 + _weight((HIDDEN,), 1)), _init("proj", _weight((HIDDEN, HIDDEN), 2))]
    x = oh.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", HIDDEN])
    y = oh.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", HIDDEN])
    return _model(nodes, [x], [y], inits)


# --- attention scores: softmax --------------------------------------------------


def attention_probs(axis: int = -1) -> onnx.ModelProto:
    """softmax(q k^T / sqrt(d)) v over [batch, seq, d]."""
    nodes = [
        oh.make_node("Transpose", ["k"], ["attn/kT"], name="attn/transpose_k", perm=[0, 2, 1]),
        oh.make_node("MatMul", ["q", "attn/kT"], ["attn/qk"], name="attn/qk"),
        oh.make_node("Mul", ["attn/qk", "scale"], ["attn/scores"], name="attn/scale"),
        oh.make_node("Softmax", ["attn/scores"], ["attn/probs"], name="attn/softmax", axis=axis),
        oh.make_node("MatMul", ["attn/probs", "v"], ["out"], name="attn/pv"),
    ]
    inits = [_init("scale", np.array(0.5, np.float32))]
    qkv = [oh.make_tensor_value_info(n, T.FLOAT, ["batch", "seq", 4]) for n in ("q", "k", "v")]
    out = oh.make_tensor_value_info("out", T.FLOAT, ["batch", "seq", 4])
    return _model(nodes, qkv, [out], inits)


def attention_probs_decomposed() -> onnx.ModelProto:
    """Softmax written out (max-subtracted Exp / ReduceSum), as a lowering pass emits it."""
    nodes = [
        oh.make_node("Transpose", ["k"], ["attn/kT"], name="attn/transpose_k", perm=[0, 2, 1]),
        oh.make_node("MatMul", ["q", "attn/kT"], ["attn/qk"], name="attn/qk"),
        oh.make_node("Mul", ["attn/qk", "scale"], ["attn/scores"], name="attn/scale"),
        oh.make_node("ReduceMax", ["attn/scores", "axes"], ["sm/max"], name="sm/max", keepdims=1),
        oh.make_node("Sub", ["attn/scores", "sm/max"], ["sm/shifted"], name="sm/sub"),
        oh.make_node("Exp", ["sm/shifted"], ["sm/exp"], name="sm/exp"),
        oh.make_node("ReduceSum", ["sm/exp", "axes"], ["sm/sum"], name="sm/sum", keepdims=1),
        oh.make_node("Div", ["sm/exp", "sm/sum"], ["attn/probs"], name="sm/div"),
        oh.make_node("MatMul", ["attn/probs", "v"], ["out"], name="attn/pv"),
    ]
    inits = [_init("scale", np.array(0.5, np.float32)), _init("axes", np.array([-1], np.int64))]
    qkv = [oh.make_tensor_value_info(n, T.FLOAT, ["batch", "seq", 4]) for n in ("q", "k", "v")]
    out = oh.make_tensor_value_info("out", T.FLOAT, ["batch", "seq", 4])
    return _model(nodes, qkv, [out], inits)


# --- a projection whose weight can be damaged ------------------------------------


def projection(weight: np.ndarray | None = None) -> onnx.ModelProto:
    """relu(x W + b) followed by a second projection."""
    w = _weight((HIDDEN, 6), 3) if weight is None else weight
    nodes = [
        oh.make_node("MatMul", ["x", "W"], ["proj/xw"], name="proj/matmul"),
        oh.make_node("Add", ["proj/xw", "b"], ["proj/biased"], name="proj/add_bias"),
        oh.make_node("Relu", ["proj/biased"], ["proj/act"], name="proj/relu"),
        oh.make_node("MatMul", ["proj/act", "W2"], ["y"], name="out/matmul"),
    ]
    inits = [_init("W", w), _init("b", _weight((6,), 4)), _init("W2", _weight((6, 3), 5))]
    x = oh.make_tensor_value_info("x", T.FLOAT, ["batch", HIDDEN])
    y = oh.make_tensor_value_info("y", T.FLOAT, ["batch", 3])
    return _model(nodes, [x], [y], inits)


def projection_weight() -> np.ndarray:
    return _weight((HIDDEN, 6), 3)


def projection_column_shifted(column: int = 2) -> onnx.ModelProto:
    """One column of W shifted down by one row (a wrong slice offset in a weight split)."""
    w = projection_weight().copy()
    w[:, column] = np.roll(w[:, column], 1)
    return projection(w)


def projection_prefolded() -> onnx.ModelProto:
    """The projection with its weight computed from constants: W = (A * 2)^T, for folding tests."""
    a = projection_weight().T / 2
    nodes = [
        oh.make_node("Mul", ["A", "two"], ["fold/scaled"], name="fold/mul"),
        oh.make_node("Transpose", ["fold/scaled"], ["W"], name="fold/transpose", perm=[1, 0]),
        oh.make_node("MatMul", ["x", "W"], ["proj/xw"], name="proj/matmul"),
        oh.make_node("Add", ["proj/xw", "b"], ["proj/biased"], name="proj/add_bias"),
        oh.make_node("Relu", ["proj/biased"], ["proj/act"], name="proj/relu"),
        oh.make_node("MatMul", ["proj/act", "W2"], ["y"], name="out/matmul"),
    ]
    inits = [
        _init("A", a.astype(np.float32)),
        _init("two", np.array(2.0, np.float32)),
        _init("b", _weight((6,), 4)),
        _init("W2", _weight((6, 3), 5)),
    ]
    x = oh.make_tensor_value_info("x", T.FLOAT, ["batch", HIDDEN])
    y = oh.make_tensor_value_info("y", T.FLOAT, ["batch", 3])
    return _model(nodes, [x], [y], inits)


# --- causal + padding mask from position ids -------------------------------------


def masked_attention(off_by_one: bool = False) -> onnx.ModelProto:
    """Self-attention whose mask is built from positions: key k is visible to query q
    when pos[k] <= pos[q] and attention_mask[k] is 1. The mutant lets each query see
    one position further (pos[k] <= pos[q] + 1)."""
    nodes = [
        oh.make_node("MatMul", ["x", "Wq"], ["attn/q"], name="attn/q_proj"),
        oh.make_node("MatMul", ["x", "Wk"], ["attn/k"], name="attn/k_proj"),
        oh.make_node("Transpose", ["attn/k"], ["attn/kT"], name="attn/transpose_k", perm=[0, 2, 1]),
        oh.make_node("MatMul", ["attn/q", "attn/kT"], ["attn/scores"], name="attn/qk"),
        oh.make_node("Unsqueeze", ["position_ids", "axis2"], ["mask/pos_q"], name="mask/pos_q"),
        oh.make_node("Unsqueeze", ["position_ids", "axis1"], ["mask/pos_k"], name="mask/pos_k"),
    ]
    query_pos = "mask/pos_q"
    if off_by_one:
        nodes.append(oh.make_node("Add", ["mask/pos_q", "one"], ["mask/pos_q_next"], name="mask/shift"))
        query_pos = "mask/pos_q_next"
    nodes += [
        oh.make_node("LessOrEqual", ["mask/pos_k", query_pos], ["mask/causal"], name="mask/causal"),
        oh.make_node("Cast", ["attention_mask"], ["mask/valid_k"], name="mask/cast", to=T.BOOL),
        oh.make_node("Unsqueeze", ["mask/valid_k", "axis1"], ["mask/valid_k3"], name="mask/unsqueeze_valid"),
        oh.make_node("And", ["mask/causal", "mask/valid_k3"], ["mask/allowed"], name="mask/and"),
        oh.make_node("Where", ["mask/allowed", "zero", "neg"], ["mask/bias"], name="mask/where"),
        oh.make_node("Add", ["attn/scores", "mask/bias"], ["attn/masked"], name="attn/add_mask"),
        oh.make_node("Softmax", ["attn/masked"], ["attn/probs"], name="attn/softmax", axis=-1),
        oh.make_node("MatMul", ["attn/probs", "x"], ["out"], name="attn/pv"),
    ]
    inits = [
        _init("Wq", _weight((4, 4), 6)),
        _init("Wk", _weight((4, 4), 7)),
        _init("axis1", np.array([1], np.int64)),
        _init("axis2", np.array([2], np.int64)),
        _init("one", np.array(1, np.int64)),
        _init("zero", np.array(0.0, np.float32)),
        _init("neg", np.array(-1e4, np.float32)),
    ]
    inputs = [
        oh.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 4]),
        oh.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"]),
        oh.make_tensor_value_info("position_ids", T.INT64, ["batch", "seq"]),
    ]
    out = oh.make_tensor_value_info("out", T.FLOAT, ["batch", "seq", 4])
    return _model(nodes, inputs, [out], inits)


# --- retained-state KV cache write ------------------------------------------------

CTX_LEN = 8


def kv_cache_write(late: bool = False) -> onnx.ModelProto:
    """Write new keys into a [batch, ctx_len, d] cache at (b, position_ids[b, s]) with ScatterND.

    The mutant shifts the write index by one slot (writes one position late).
    """
    nodes = [
        oh.make_node("Shape", ["position_ids"], ["kv/shape"], name="kv/shape"),
        oh.make_node("Gather", ["kv/shape", "zero"], ["kv/batch"], name="kv/batch", axis=0),
        oh.make_node("Range", ["zero", "kv/batch", "one"], ["kv/batch_range"], name="kv/batch_range"),
        oh.make_node("Unsqueeze", ["kv/batch_range", "axis1"], ["kv/batch_col"], name="kv/batch_col"),
        oh.make_node("Expand", ["kv/batch_col", "kv/shape"], ["kv/batch_idx"], name="kv/batch_idx"),
        oh.make_node("Unsqueeze", ["kv/batch_idx", "axis_last"], ["kv/b3"], name="kv/b3"),
        oh.make_node("Unsqueeze", ["position_ids", "axis_last"], ["kv/p3"], name="kv/p3"),
        oh.make_node("Concat", ["kv/b3", "kv/p3"], ["kv/indices"], name="kv/indices", axis=-1),
    ]
    indices = "kv/indices"
    if late:
        nodes.append(oh.make_node("Add", ["kv/indices", "slot_step"], ["kv/indices_late"], name="kv/shift"))
        indices = "kv/indices_late"
    nodes += [
        oh.make_node("ScatterND", ["past_key", indices, "new_key"], ["kv/updated"], name="kv/scatter"),
        oh.make_node("Identity", ["kv/updated"], ["past_key_RetainedState"], name="kv/out"),
    ]
    inits = [
        _init("zero", np.array(0, np.int64)),
        _init("one", np.array(1, np.int64)),
        _init("axis1", np.array([1], np.int64)),
        _init("axis_last", np.array([-1], np.int64)),
        _init("slot_step", np.array([0, 1], np.int64)),
    ]
    inputs = [
        oh.make_tensor_value_info("past_key", T.FLOAT, ["batch", CTX_LEN, 4]),
        oh.make_tensor_value_info("new_key", T.FLOAT, ["batch", "seq", 4]),
        oh.make_tensor_value_info("position_ids", T.INT64, ["batch", "seq"]),
    ]
    out = oh.make_tensor_value_info("past_key_RetainedState", T.FLOAT, ["batch", CTX_LEN, 4])
    return _model(nodes, inputs, [out], inits)


# --- a token-id model, for the strategies -------------------------------------------

VOCAB = 50


def embedding_model() -> onnx.ModelProto:
    """input_ids -> Cast -> Gather over a [VOCAB, 4] table, plus mask and positions."""
    nodes = [
        oh.make_node("Cast", ["input_ids"], ["ids32"], name="cast_ids", to=T.INT32),
        oh.make_node("Gather", ["embed_tokens", "ids32"], ["hidden"], name="embed", axis=0),
        oh.make_node("Cast", ["attention_mask"], ["mask_f"], name="cast_mask", to=T.FLOAT),
        oh.make_node("Cast", ["position_ids"], ["pos_f"], name="cast_pos", to=T.FLOAT),
    ]
    inits = [_init("embed_tokens", _weight((VOCAB, 4), 8))]
    inputs = [
        oh.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
        oh.make_tensor_value_info("attention_mask", T.INT64, ["batch", "past + seq"]),
        oh.make_tensor_value_info("position_ids", T.INT64, ["batch", "seq"]),
    ]
    outputs = [
        oh.make_tensor_value_info("hidden", T.FLOAT, ["batch", "seq", 4]),
        oh.make_tensor_value_info("mask_f", T.FLOAT, ["batch", "past + seq"]),
        oh.make_tensor_value_info("pos_f", T.FLOAT, ["batch", "seq"]),
    ]
    return _model(nodes, inputs, outputs, inits)

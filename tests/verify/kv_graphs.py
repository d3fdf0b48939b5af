"""A tiny causal attention "LM" in the three KV-cache forms of docs/design.md, and mutants.

All three forms compute the same function with the same weights:

* :func:`no_cache_lm` -- ``input_ids`` + ``attention_mask`` [batch, seq] ->
  ``logits`` [batch, seq, vocab]. Positions are ``cumsum(mask) - 1`` (padding
  set to 1, Hugging Face's rule), so a left-padded row gets the logits of its
  unpadded sequence. Query i sees key j iff j <= i and mask[j] == 1.
* :func:`retained_lm` -- the device's retained-state form: ``input_ids``,
  ``position_ids`` (-1 = padding), ``past_key.{i}``/``past_value.{i}``
  [batch, heads, ctx_len, head_dim]; outputs ``logits`` then
  ``past_key.{i}_RetainedState``/``past_value.{i}_RetainedState``. K/V of a
  token are written with ScatterND into slot ``position_ids``; query with
  position p sees slots c <= p (mask from a position comparison, no Trilu).
* :func:`concat_lm` -- optimum's form: ``attention_mask`` [batch, past+seq],
  ``position_ids``, ``past_key_values.{i}.key/.value`` -> ``logits``,
  ``present.{i}.key/.value`` = Concat(past, new) on the sequence axis.

Padding writes in the retained form. ScatterND wraps a negative index to the
end of the axis, so writing at position -1 would land in slot ctx_len-1 only
by accident of the wrap; the graph makes it explicit: a token whose position
is -1 is written to slot ``ctx_len - 1``, the slot reserved for padding. A
valid query at position p sees only slots c <= p, so the junk there is never
read as long as every valid position is below ``ctx_len - 1``: the constraint
is **total_len < ctx_len** (``check_sequence_equivalence`` draws sequences
of at most ``ctx_len - 1`` tokens for this reason). Several padding tokens
of a row write the same slot in one ScatterND (duplicate indices, unspecified
order in ONNX); only that reserved slot is affected. Every slot c <= p has
been written before a query at p runs, provided the sequence is replayed in
order, so "c <= p" suffices as the visibility rule.

Mutants (each one thing a wrong KV-cache pass would do):

* ``retained_lm(mutant="late_write")``: K/V written at position_ids + 1.
* ``retained_lm(mutant="mask_strict")``: slot visible iff c < p (off by one).
* ``retained_lm(mutant="stale_state")``: the ``*_RetainedState`` outputs are
  the incoming cache, so the next step sees zeros (the cache is not fed back).
* ``concat_lm(mutant="ignore_past")``: the causal mask forgets the past
  length (query i is treated as position i, not past + i), so decode steps
  see only the first keys.
* ``concat_lm(mutant="drop_past")``: ``present`` holds only the new K/V.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper

OPSET = 17
VOCAB = 32
HIDDEN = 8
MAX_POSITIONS = 32  # rows of the position-embedding table
CTX_LEN = 10
NEG = -1.0e9

RETAINED_MUTANTS = ("late_write", "mask_strict", "stale_state")
CONCAT_MUTANTS = ("ignore_past", "drop_past")


def _weights(layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.5) -> np.ndarray:
        return rng.normal(0.0, scale, shape).astype(np.float32)

    out = {"embed": w(VOCAB, HIDDEN), "pos_embed": w(MAX_POSITIONS, HIDDEN), "lm_head": w(HIDDEN, VOCAB)}
    for i in range(layers):
        for name in ("wq", "wk", "wv", "wo"):
            out[f"l{i}.{name}"] = w(HIDDEN, HIDDEN)
    return out


class _Builder:
    """Just enough of a graph builder: fresh names, constants, nodes."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits = [numpy_helper.from_array(a, n) for n, a in weights.items()]
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(oh.make_node(op_type, list(inputs), [out], name=f"n/{out}", **attrs))
        return out


def _heads(b: _Builder, x: str, heads: int) -> str:
    """[B, S, D] -> [B, H, S, hd]."""
    shaped = b.op("Reshape", x, b.const([0, 0, heads, HIDDEN // heads]))
    return b.op("Transpose", shaped, perm=[0, 2, 1, 3])


def _embed(b: _Builder, ids: str, positions: str) -> str:
    tok = b.op("Gather", "embed", ids)
    pos = b.op("Gather", "pos_embed", positions)
    return b.op("Add", tok, pos)


def _attend(b: _Builder, x: str, q: str, keys: str, values: str, visible: str, layer: int, heads: int) -> str:
    """Residual attention block given head-split q [B,H,S,hd], keys/values [B,H,K,hd], visible [B,1,S,K]."""
    scale = b.const(1.0 / np.sqrt(HIDDEN // heads), np.float32)
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", keys, perm=[0, 1, 3, 2])), scale)
    scores = b.op("Where", visible, scores, b.const(NEG, np.float32))
    probs = b.op("Softmax", scores, axis=-1)
    ctx = b.op("Transpose", b.op("MatMul", probs, values), perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", ctx, b.const([0, 0, HIDDEN]))
    return b.op("Add", x, b.op("MatMul", ctx, f"l{layer}.wo"))


def _qkv(b: _Builder, x: str, layer: int, heads: int) -> tuple[str, str, str]:
    return tuple(_heads(b, b.op("MatMul", x, f"l{layer}.{w}"), heads) for w in ("wq", "wk", "wv"))  # type: ignore[return-value]


def _model(b: _Builder, inputs, outputs) -> onnx.ModelProto:
    graph = oh.make_graph(b.nodes, "tiny_lm", inputs, outputs, b.inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, dtype, shape)


def no_cache_lm(*, layers: int = 1, heads: int = 1, position_ids_input: bool = False, seed: int = 0) -> onnx.ModelProto:
    """The reference: ``input_ids``, ``attention_mask`` [batch, seq] -> ``logits`` [batch, seq, vocab].

    With ``position_ids_input`` the positions are an input (fed by the
    replayer with Hugging Face's rule) instead of computed from the mask.
    """
    b = _Builder(_weights(layers, seed))
    inputs = [_vi("input_ids", T.INT64, ["batch", "seq"]), _vi("attention_mask", T.INT64, ["batch", "seq"])]
    if position_ids_input:
        inputs.append(_vi("position_ids", T.INT64, ["batch", "seq"]))
        positions = "position_ids"
    else:
        cum = b.op("Sub", b.op("CumSum", "attention_mask", b.const(1)), b.const(1))
        pad = b.op("Equal", "attention_mask", b.const(0))
        positions = b.op("Where", pad, b.const(1), cum)
    x = _embed(b, "input_ids", positions)
    seq = b.op("Gather", b.op("Shape", "input_ids"), b.const(1))
    cols = b.op("Range", b.const(0), seq, b.const(1))
    causal = b.op(
        "LessOrEqual",
        b.op("Unsqueeze", cols, b.const([0])),  # key j: [1, S]
        b.op("Unsqueeze", cols, b.const([1])),  # query i: [S, 1]
    )
    key_ok = b.op("Unsqueeze", b.op("Cast", "attention_mask", to=T.BOOL), b.const([1, 2]))  # [B,1,1,S]
    visible = b.op("And", causal, key_ok)  # [B,1,S,S]
    for layer in range(layers):
        q, k, v = _qkv(b, x, layer, heads)
        x = _attend(b, x, q, k, v, visible, layer, heads)
    b.op("MatMul", x, "lm_head", out="logits")
    return _model(b, inputs, [_vi("logits", T.FLOAT, ["batch", "seq", VOCAB])])


def retained_lm(
    *,
    layers: int = 1,
    heads: int = 1,
    ctx_len: int | None = CTX_LEN,
    seq_len: int | None = None,
    last_logits: bool = False,
    mutant: str | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """The retained-state form (docs/design.md); ``ctx_len=None`` leaves the cache length symbolic.

    ``seq_len`` fixes the seq dim (a static specialization); ``last_logits``
    returns ``logits`` [batch, 1, vocab] at argmax(position_ids) per row.
    """
    if mutant not in (None, *RETAINED_MUTANTS):
        raise ValueError(f"unknown retained mutant {mutant!r}")
    b = _Builder(_weights(layers, seed))
    hd = HIDDEN // heads
    seq_dim = seq_len if seq_len is not None else "seq"
    cache_shape = ["batch", heads, ctx_len if ctx_len is not None else "ctx_len", hd]
    inputs = [_vi("input_ids", T.INT64, ["batch", seq_dim]), _vi("position_ids", T.INT64, ["batch", seq_dim])]
    outputs = [_vi("logits", T.FLOAT, ["batch", 1 if last_logits else seq_dim, VOCAB])]
    for i in range(layers):
        inputs += [_vi(f"past_key.{i}", T.FLOAT, cache_shape), _vi(f"past_value.{i}", T.FLOAT, cache_shape)]
        outputs += [
            _vi(f"past_key.{i}_RetainedState", T.FLOAT, cache_shape),
            _vi(f"past_value.{i}_RetainedState", T.FLOAT, cache_shape),
        ]

    zero, one = b.const(0), b.const(1)
    x = _embed(b, "input_ids", b.op("Max", "position_ids", zero))
    shape = b.op("Shape", "input_ids")
    batch, seq = b.op("Gather", shape, zero), b.op("Gather", shape, one)
    ctx = b.op("Gather", b.op("Shape", "past_key.0"), b.const(2))
    is_pad = b.op("Less", "position_ids", zero)
    written = b.op("Add", "position_ids", one) if mutant == "late_write" else "position_ids"
    slot = b.op("Where", is_pad, b.op("Sub", ctx, one), written)  # [B,S]; padding -> slot ctx_len-1
    # ScatterND indices [B, H, S, 3] = (b, h, slot[b, s]).
    grid = b.op("Concat", b.op("Unsqueeze", batch, b.const([0])), b.const([heads]),
                b.op("Unsqueeze", seq, b.const([0])), axis=0)
    b_idx = b.op("Expand", b.op("Reshape", b.op("Range", zero, batch, one), b.const([-1, 1, 1])), grid)
    h_idx = b.op("Expand", b.op("Reshape", b.op("Range", zero, b.const(heads), one), b.const([1, -1, 1])), grid)
    s_idx = b.op("Expand", b.op("Unsqueeze", slot, b.const([1])), grid)
    last = b.const([-1])
    indices = b.op("Concat", *(b.op("Unsqueeze", t, last) for t in (b_idx, h_idx, s_idx)), axis=-1)
    # Query with position p sees slot c iff c <= p (mask_strict: c < p).
    slots = b.op("Reshape", b.op("Range", zero, ctx, one), b.const([1, 1, 1, -1]))  # [1,1,1,C]
    query_pos = b.op("Unsqueeze", "position_ids", b.const([1, 3]))  # [B,1,S,1]
    visible = b.op("Less" if mutant == "mask_strict" else "LessOrEqual", slots, query_pos)

    for layer in range(layers):
        q, k, v = _qkv(b, x, layer, heads)
        caches = []
        for kind, new in (("key", k), ("value", v)):
            past = f"past_{kind}.{layer}"
            updated = b.op("ScatterND", past, indices, new)
            b.op("Identity", past if mutant == "stale_state" else updated, out=f"{past}_RetainedState")
            caches.append(updated)
        x = _attend(b, x, q, caches[0], caches[1], visible, layer, heads)

    if last_logits:
        at = b.op("ArgMax", "position_ids", axis=1, keepdims=1)  # [B,1]
        at = b.op("Expand", b.op("Unsqueeze", at, b.const([2])), b.op("Concat", b.op("Unsqueeze", batch, b.const([0])),
                                                                      b.const([1, HIDDEN]), axis=0))
        x = b.op("GatherElements", x, at, axis=1)  # [B,1,D]
    b.op("MatMul", x, "lm_head", out="logits")
    return _model(b, inputs, outputs)


def concat_lm(*, layers: int = 1, heads: int = 1, mutant: str | None = None, seed: int = 0,
              positions: str = "input") -> onnx.ModelProto:
    """The concat form (optimum / onnxruntime-genai names).

    ``positions="columns"``: no ``position_ids`` input; the graph counts
    positions from column 0 (past + arange(seq)), as a plain export does, so
    a left-padded row sees shifted positions.
    """
    if mutant not in (None, *CONCAT_MUTANTS):
        raise ValueError(f"unknown concat mutant {mutant!r}")
    b = _Builder(_weights(layers, seed))
    hd = HIDDEN // heads
    past_shape = ["batch", heads, "past", hd]
    present_shape = ["batch", heads, "total", hd]
    inputs = [
        _vi("input_ids", T.INT64, ["batch", "seq"]),
        _vi("attention_mask", T.INT64, ["batch", "total"]),
    ]
    if positions == "input":
        inputs.append(_vi("position_ids", T.INT64, ["batch", "seq"]))
    outputs = [_vi("logits", T.FLOAT, ["batch", "seq", VOCAB])]
    for i in range(layers):
        inputs += [_vi(f"past_key_values.{i}.key", T.FLOAT, past_shape),
                   _vi(f"past_key_values.{i}.value", T.FLOAT, past_shape)]
        outputs += [_vi(f"present.{i}.key", T.FLOAT, present_shape), _vi(f"present.{i}.value", T.FLOAT, present_shape)]

    zero, one = b.const(0), b.const(1)
    seq = b.op("Gather", b.op("Shape", "input_ids"), one)
    past = b.op("Gather", b.op("Shape", "past_key_values.0.key"), b.const(2))
    if positions == "input":
        x = _embed(b, "input_ids", "position_ids")
    else:
        columns = b.op("Range", past, b.op("Add", past, seq), one)  # [S], broadcast over the batch
        x = _embed(b, "input_ids", b.op("Unsqueeze", columns, b.const([0])))
    total = b.op("Gather", b.op("Shape", "attention_mask"), one)
    offset = zero if mutant == "ignore_past" else past
    query_abs = b.op("Add", b.op("Range", zero, seq, one), offset)  # [S]
    keys = b.op("Range", zero, total, one)  # [T]
    causal = b.op("LessOrEqual", b.op("Unsqueeze", keys, b.const([0])), b.op("Unsqueeze", query_abs, b.const([1])))
    key_ok = b.op("Unsqueeze", b.op("Cast", "attention_mask", to=T.BOOL), b.const([1, 2]))  # [B,1,1,T]
    visible = b.op("And", causal, key_ok)  # [B,1,S,T]

    for layer in range(layers):
        q, k, v = _qkv(b, x, layer, heads)
        full = []
        for kind, new in (("key", k), ("value", v)):
            cat = b.op("Concat", f"past_key_values.{layer}.{kind}", new, axis=2)
            b.op("Identity", new if mutant == "drop_past" else cat, out=f"present.{layer}.{kind}")
            full.append(cat)
        x = _attend(b, x, q, full[0], full[1], visible, layer, heads)
    b.op("MatMul", x, "lm_head", out="logits")
    return _model(b, inputs, outputs)

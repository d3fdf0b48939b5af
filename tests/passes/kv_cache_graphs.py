"""Small canonical decoders (opset 23 ``Attention`` nodes) in the mask spellings exporters use.

The zoo covers real exports; these cover the spellings one export does not
show, and the graphs the pass must refuse:

* ``mask="bool"``: causal & padding as a bool mask (the dynamo exporter);
* ``mask="float"``: the same as an additive float mask (0 / finfo.min);
* ``mask="window"``: bool with a sliding window of ``window`` keys;
* ``mask="causal-attr"``: no mask input, ``is_causal=1``;
* ``mask="bidirectional"``: padding only (an encoder) -- must be refused;
* ``positions="cumsum"``: clamp(cumsum(mask) - 1, 0), as the export wrapper
  computes them; ``positions="range"``: Unsqueeze(Range(0, seq), 0), what
  Hugging Face computes without position ids (blind to left padding);
  ``positions="range-direct"``: the Range read as is, [S];
  ``positions="reversed"``: seq - 1 - Range(0, seq) -- a function of the
  length, not of positions: must be refused;
* ``spelling=PositionSpelling(...)``: positions counted, offset, typed and
  laid out in any of the ways exporters do, read by a table or a sinusoid.

Positions feed a learned position-embedding table, GQA has 2 query heads
per KV head, and ``softcap`` sets the Attention attribute.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper

VOCAB, HIDDEN, HEADS, KV_HEADS, POSITIONS = 48, 16, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS


class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def weight(self, *shape: int, scale: float = 0.5) -> str:
        return self.const(self.rng.normal(0, scale, shape), np.float32, hint="w")

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        self._n += 1
        name = f"{hint}_{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self._n += 1
        out = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(oh.make_node(op_type, list(inputs), [out], name=f"n{self._n}_{op_type}", **attrs))
        return out


@dataclasses.dataclass(frozen=True)
class PositionSpelling:
    """One way an exporter may compute and lay out positions (``spelling=`` of :func:`decoder`).

    * ``count``: ``column`` (Range(0, seq), blind to padding), ``mask``
      (cumsum(mask) - 1) or ``mask-times-mask`` (cumsum(mask) * mask - 1, OPT);
    * ``offset`` added to the count (OPT's 2);
    * ``layout``: ``BS`` ([B or 1, S]), ``S``, ``1S1``, ``11S`` or ``S1``
      (``S`` and ``S1`` have no batch axis: column counts only);
    * ``dtype``: ``int`` or ``float`` (cast before the layout);
    * ``embedding``: ``table`` (Gather from learned positions) or ``sinusoid``
      (sin(pos * freq), as rotary tables are computed).
    """

    count: str = "column"
    offset: int = 0
    layout: str = "BS"
    dtype: str = "int"
    embedding: str = "table"


def spelled_positions(g: _Graph, seq: str, spelling: PositionSpelling) -> str:
    """The position embedding [B or 1, S, H] or [S, H] computed as ``spelling`` says."""
    zero, one = g.const(0), g.const(1)
    if spelling.count == "column":
        pos = g.op("Unsqueeze", g.op("Range", zero, seq, one), g.const([0]))  # [1, S]
    else:
        counted = g.op("CumSum", "attention_mask", one)
        if spelling.count == "mask-times-mask":
            counted = g.op("Mul", counted, "attention_mask")
        pos = g.op("Sub", counted, one)  # [B, S]
        if spelling.embedding == "table":
            pos = g.op("Max", pos, zero)  # padding reads row 0 of the table
    if spelling.offset:
        pos = g.op("Add", pos, g.const(spelling.offset))
    if spelling.dtype == "float":
        pos = g.op("Cast", pos, to=T.FLOAT)
    squeeze = {"BS": None, "S": None, "1S1": [2], "11S": [1], "S1": [1]}[spelling.layout]
    if spelling.layout in ("S", "S1"):
        pos = g.op("Squeeze", pos, g.const([0]))
    if spelling.layout in ("1S1", "S1"):
        pos = g.op("Unsqueeze", pos, g.const([-1 if spelling.layout == "S1" else 2]))
    elif spelling.layout == "11S":
        pos = g.op("Unsqueeze", pos, g.const([1]))
    if spelling.embedding == "table":
        if spelling.dtype == "float":
            pos = g.op("Cast", pos, to=T.INT64)
        emb = g.op("Gather", g.weight(POSITIONS, HIDDEN), pos)
    else:
        as_float = pos if spelling.dtype == "float" else g.op("Cast", pos, to=T.FLOAT)
        freqs = g.const(1.0 / (10.0 ** (np.arange(HIDDEN) / HIDDEN)), np.float32)
        emb = g.op("Sin", g.op("Mul", g.op("Unsqueeze", as_float, g.const([-1])), freqs))
    return g.op("Squeeze", emb, g.const(squeeze)) if squeeze else emb


def _heads(g: _Graph, x: str, heads: int) -> str:
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, heads, HEAD_DIM])), perm=[0, 2, 1, 3])


def decoder(
    *,
    layers: int = 2,
    mask: str = "bool",
    positions: str = "cumsum",
    window: int = 3,
    softcap: float = 0.0,
    mask_scales_logits: bool = False,
    spelling: PositionSpelling | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """``input_ids``, ``attention_mask`` -> ``logits``: a canonical no-cache decoder.

    ``mask_scales_logits`` multiplies the logits by the mask: a use of the
    mask the KV-cache pass cannot account for.
    """
    g = _Graph(seed)
    zero, one = g.const(0), g.const(1)
    seq = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0]))
    pos = None
    if spelling is not None:
        pass
    elif positions == "cumsum":
        pos = g.op("Clip", g.op("Sub", g.op("CumSum", "attention_mask", one), one), zero)
    elif positions == "range":
        pos = g.op("Unsqueeze", g.op("Range", zero, seq, one), g.const([0]))
    elif positions == "range-direct":  # [S] straight into the table: [S, H] broadcast over the batch
        pos = g.op("Range", zero, seq, one)
    elif positions == "reversed":  # counted back from the last token: a function of the length, not of positions
        pos = g.op("Sub", g.op("Sub", seq, one), g.op("Range", zero, seq, one))
    else:
        raise ValueError(positions)
    if spelling is not None:
        position_embedding = spelled_positions(g, seq, spelling)
    else:
        position_embedding = g.op("Gather", g.weight(POSITIONS, HIDDEN), pos)
    x = g.op("Add", g.op("Gather", g.weight(VOCAB, HIDDEN), "input_ids"), position_embedding)

    cols = g.op("Range", zero, seq, one)
    keys, queries = g.op("Unsqueeze", cols, g.const([0])), g.op("Unsqueeze", cols, g.const([1]))
    key_ok = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=T.BOOL), g.const([1, 2]))  # [B,1,1,S]
    causal = g.op("LessOrEqual", keys, queries)
    if mask == "window":
        causal = g.op("And", causal, g.op("Greater", keys, g.op("Sub", queries, g.const(window))))
    if mask == "bidirectional":  # every key of the row, as [B, 1, S, S] (onnxruntime wants the query dim)
        causal = g.op("GreaterOrEqual", queries, zero)
    visible = g.op("And", causal, key_ok)
    if mask == "float":
        lowest = np.finfo(np.float32).min
        attn_mask = g.op("Where", visible, g.const(0.0, np.float32), g.const(lowest, np.float32))
    else:
        attn_mask = visible

    for _ in range(layers):
        q = _heads(g, g.op("MatMul", x, g.weight(HIDDEN, HIDDEN)), HEADS)
        k = _heads(g, g.op("MatMul", x, g.weight(HIDDEN, KV_HEADS * HEAD_DIM)), KV_HEADS)
        v = _heads(g, g.op("MatMul", x, g.weight(HIDDEN, KV_HEADS * HEAD_DIM)), KV_HEADS)
        if mask == "causal-attr":
            y = g.op("Attention", q, k, v, scale=float(HEAD_DIM**-0.5), is_causal=1, softcap=softcap)
        else:
            y = g.op("Attention", q, k, v, attn_mask, scale=float(HEAD_DIM**-0.5), softcap=softcap)
        y = g.op("Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]), g.const([0, 0, HIDDEN]))
        x = g.op("Add", x, g.op("MatMul", y, g.weight(HIDDEN, HIDDEN)))
    if mask_scales_logits:
        scale = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=T.FLOAT), g.const([2]))
        g.op("Mul", g.op("MatMul", x, g.weight(HIDDEN, VOCAB)), scale, out="logits")
    else:
        g.op("MatMul", x, g.weight(HIDDEN, VOCAB), out="logits")

    inputs = [oh.make_tensor_value_info(n, T.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    outputs = [oh.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", VOCAB])]
    model = oh.make_model(oh.make_graph(g.nodes, "canonical_decoder", inputs, outputs, g.inits),
                          opset_imports=[oh.make_opsetid("", 23)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    return model

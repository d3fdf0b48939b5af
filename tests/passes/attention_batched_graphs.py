"""Attention with position biases: BLOOM's batched heads (3-D [B*H, S, D]) and 4-D heads, drawn by hypothesis.

``batched_cores()`` draws the sizes and every variant the fusion must
recognize -- where the scores' scale sits, a position bias (ALiBi: slope_h *
key position) added before and/or after the scale, computed from the
attention mask or from shapes only, the mask kind (additive finfo.min or
-inf, or a boolean Where), how the views spell their targets, the NaN
guard and Casts -- and, sometimes, one change after which the subgraph
must *not* fuse (``broken``). ``build`` writes an opset-23 model with
symbolic B, S, T whose views read their targets from ``Shape`` at run time
as the exporters do. ``layout="heads"`` writes the same core on 4-D
[B, H, S, T] scores with the bias viewed as [B, H, 1, T] (Falcon's ALiBi);
the view-breaking variants then do not apply. Inputs: Q [B, H, S, D], K and V [B, H, T, D],
``attention_mask`` int64 [B, T] (and ``input_ids`` [B, T]); output Y
[B, H, S, D].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

#: Changes that make the core something the canonical Attention must not absorb.
BROKEN = (
    "bias-from-tokens",      # the bias reads input_ids: token data, not positions
    "bias-from-query",       # the bias reads Q
    "mixed-heads",           # Q is [B, S, H, D] viewed as [B*H, S, D]: positions and heads mixed
    "swapped-scores-view",   # the scores viewed as [H, B, S, T]: heads taken before batch
)

MIN = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class BatchedCore:
    heads: int
    head_dim: int
    scale: float
    scale_at: str        # none, qk-mul, qk-div, q
    bias: str            # none, before-scale, after-scale, both
    bias_from: str       # mask (cumsum of attention_mask), shapes (key index)
    mask: str            # none, additive-min, additive-inf, bool-where-inf, bool-where-min
    causal: bool         # the exporter's mask also hides later keys
    views: str           # dynamo ([B*H, S, D] from shapes), torchscript ([B*H, -1, D], probs [-1, S, T])
    layout: str          # batched (3-D products), heads (4-D products, no views)
    guard: bool
    casts: bool
    broken: str | None

    @property
    def has_bias(self) -> bool:
        return self.bias != "none"


@st.composite
def batched_cores(draw: st.DrawFn, broken: bool | None = None) -> BatchedCore:
    head_dim = draw(st.sampled_from([4, 8]))
    if broken is None:
        broken = draw(st.booleans())
    kind = draw(st.sampled_from(BROKEN)) if broken else None
    mask = draw(st.sampled_from(["none", "additive-min", "additive-inf", "bool-where-inf", "bool-where-min"]))
    bias = draw(st.sampled_from(["none", "before-scale", "after-scale", "both"]))
    bias_from = draw(st.sampled_from(["mask", "shapes"]))
    heads = draw(st.sampled_from([1, 2, 3]))
    if kind in ("bias-from-tokens", "bias-from-query") and bias == "none":
        bias = "after-scale"
    layout = draw(st.sampled_from(["batched", "heads"]))
    if layout == "heads" and kind in ("mixed-heads", "swapped-scores-view"):
        kind = draw(st.sampled_from(["bias-from-tokens", "bias-from-query"]))
        bias = "after-scale" if bias == "none" else bias
    if layout == "heads" and kind is None and bias == "none":
        bias = "before-scale"  # a 4-D core without a bias is the plain rule's (tests/passes/test_attention.py)
    if kind == "bias-from-tokens" and mask == "none":
        # Without an exporter's mask nothing tells input_ids from an attention mask: the bias is
        # token data only next to a mask that reads attention_mask.
        mask = "additive-min"
    if kind == "swapped-scores-view":
        mask, bias_from, heads = "none", "shapes", draw(st.sampled_from([2, 3]))  # no [B, ...] mask to broadcast
    if mask == "none" and bias_from == "mask" and kind != "bias-from-tokens":
        bias_from = "shapes"  # a bias that reads the mask needs the exporter's mask to read it too
    return BatchedCore(
        heads=heads,
        head_dim=head_dim,
        scale=float(draw(st.sampled_from([1 / np.sqrt(head_dim), 0.3]))),
        scale_at=draw(st.sampled_from(["none", "qk-mul", "qk-div", "q"])),
        bias=bias,
        bias_from=bias_from,
        mask=mask,
        causal=draw(st.booleans()),
        views=draw(st.sampled_from(["dynamo", "torchscript"])),
        layout=layout,
        guard=draw(st.booleans()),
        casts=draw(st.booleans()),
        broken=kind,
    )


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, value, dtype=np.float32) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                           name=f"/h.0/self_attention/{op_type}_{self.count}", **attrs))
        return out

    def shape(self, x: str, start: int, end: int) -> str:
        return self.op("Shape", x, start=start, end=end)


def _merge_heads(g: _Graph, x: str, core: BatchedCore) -> str:
    """[B, H, L, D] -> [B*H, L, D] the way each exporter spells the target."""
    batch_heads = g.op("Mul", g.shape(x, 0, 1), g.ints(core.heads))
    if core.views == "dynamo":
        target = g.op("Concat", batch_heads, g.shape(x, 2, 4), axis=0)
    else:
        target = g.op("Concat", batch_heads, g.ints(-1), g.ints(core.head_dim), axis=0)
    return g.op("Reshape", x, target)


def _positions(g: _Graph, core: BatchedCore) -> str:
    """Key positions [B, 1, T] (float): from the mask (BLOOM) or the key index (shapes only)."""
    if core.broken == "bias-from-tokens":
        source = g.op("Cast", "input_ids", to=TensorProto.FLOAT)
        return g.op("Unsqueeze", source, g.ints(1))
    if core.bias_from == "mask":
        mask = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)
        counted = g.op("Sub", g.op("CumSum", mask, g.const(1, np.int64)), g.const(1.0))
        return g.op("Unsqueeze", g.op("Mul", counted, mask), g.ints(1))
    length = g.op("Squeeze", g.shape("K", 2, 3), g.ints(0))
    index = g.op("Cast", g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64)), to=TensorProto.FLOAT)
    rows = g.op("Concat", g.shape("Q", 0, 1), g.ints(1, 1), axis=0)
    return g.op("Expand", g.op("Reshape", index, g.ints(1, 1, -1)), rows)  # [B, 1, T]


def _alibi(g: _Graph, core: BatchedCore, which: int) -> str:
    """slope_h * position as [B*H, 1, T] (BLOOM's build_alibi_tensor)."""
    if core.broken == "bias-from-query":
        if core.layout == "heads":
            return g.op("ReduceMean", "Q", g.ints(3), keepdims=1)  # [B, H, S, 1]
        return g.op("ReduceMean", _merge_heads(g, "Q", core), g.ints(2), keepdims=1)  # [B*H, S, 1]
    slopes = (0.5 ** np.arange(1, core.heads + 1, dtype=np.float32) * (1 + which)).reshape(core.heads, 1)
    scaled = g.op("Mul", g.const(slopes), _positions(g, core))  # [B, H, T]
    if core.bias_from == "mask" or core.broken:
        batch, length = g.shape("attention_mask", 0, 1), g.shape("attention_mask", 1, 2)
    else:
        batch, length = g.shape("Q", 0, 1), g.shape("K", 2, 3)
    if core.layout == "heads":  # Falcon: alibi.view(B, H, 1, -1)
        return g.op("Reshape", scaled, g.op("Concat", batch, g.ints(core.heads, 1, -1), axis=0))
    target = g.op("Concat", g.op("Mul", batch, g.ints(core.heads)), g.ints(1), length, axis=0)
    return g.op("Reshape", scaled, target)


def _keep(g: _Graph, core: BatchedCore) -> str:
    """The exporter's boolean mask [B, 1, S|1, T]: padding from attention_mask, maybe causal."""
    keep = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.ints(1, 2))
    if not core.causal:
        return keep
    s = g.op("Squeeze", g.shape("Q", 2, 3), g.ints(0))
    t = g.op("Squeeze", g.shape("K", 2, 3), g.ints(0))
    one = g.const(1, np.int64)
    rows = g.op("Add", g.op("Range", g.const(0, np.int64), s, one), g.op("Sub", t, s))  # query i sits at T-S+i
    cols = g.op("Range", g.const(0, np.int64), t, one)
    causal = g.op("LessOrEqual", g.op("Unsqueeze", cols, g.ints(0)), g.op("Unsqueeze", rows, g.ints(1)))
    return g.op("And", keep, causal)


def build(core: BatchedCore) -> onnx.ModelProto:
    g = _Graph()
    q_input = "Q"
    if core.layout == "heads":
        return _build_heads(g, core)
    if core.broken == "mixed-heads":
        q_input = g.op("Transpose", "Q", perm=[0, 2, 1, 3])  # [B, S, H, D], viewed as if it were BHSD
        batch_heads = g.op("Mul", g.shape("Q", 0, 1), g.ints(core.heads))
        q3 = g.op("Reshape", q_input, g.op("Concat", batch_heads, g.ints(-1), g.ints(core.head_dim), axis=0))
    else:
        q3 = _merge_heads(g, q_input, core)
    if core.scale_at == "q":
        q3 = g.op("Mul", q3, g.const(core.scale))
    kt3 = g.op("Transpose", _merge_heads(g, "K", core), perm=[0, 2, 1])
    v3 = _merge_heads(g, "V", core)

    scores = g.op("MatMul", q3, kt3)
    if core.bias in ("before-scale", "both"):
        scores = g.op("Add", scores, _alibi(g, core, 0))
    if core.scale_at == "qk-mul":
        scores = g.op("Mul", scores, g.const(core.scale))
    elif core.scale_at == "qk-div":
        scores = g.op("Div", scores, g.const(1 / core.scale))
    if core.bias in ("after-scale", "both"):
        scores = g.op("Add", _alibi(g, core, 1), scores)

    if core.broken == "swapped-scores-view":
        target = g.op("Concat", g.ints(core.heads), g.shape("Q", 0, 1), g.shape("Q", 2, 3), g.ints(-1), axis=0)
    elif core.views == "dynamo":
        target = g.op("Concat", g.shape("Q", 0, 3), g.shape("K", 2, 3), axis=0)
    else:
        target = g.op("Concat", g.shape("Q", 0, 1), g.ints(core.heads), g.shape("Q", 2, 3), g.ints(-1), axis=0)
    scores4 = g.op("Reshape", scores, target)

    if core.mask.startswith("additive"):
        fill = MIN if core.mask == "additive-min" else -np.inf
        additive = g.op("Where", _keep(g, core), g.const(0.0), g.const(fill))
        scores4 = g.op("Add", scores4, additive)
    elif core.mask.startswith("bool-where"):
        fill = MIN if core.mask == "bool-where-min" else -np.inf
        scores4 = g.op("Where", _keep(g, core), scores4, g.const(fill))
    probs = g.op("Softmax", scores4, axis=-1)
    if core.guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    if core.casts:
        probs = g.op("Cast", g.op("Cast", probs, to=TensorProto.FLOAT), to=TensorProto.FLOAT)
    if core.views == "dynamo":
        back = g.op("Concat", g.op("Mul", g.shape("Q", 0, 1), g.ints(core.heads)), g.shape("Q", 2, 3), g.ints(-1),
                    axis=0)
    else:
        back = g.op("Concat", g.ints(-1), g.shape("Q", 2, 3), g.shape("K", 2, 3), axis=0)
    out3 = g.op("MatMul", g.op("Reshape", probs, back), v3)
    g.nodes.append(helper.make_node("Reshape", [out3, g.op("Concat", g.shape("Q", 0, 3), g.ints(core.head_dim),
                                                           axis=0)], ["Y"], name="/h.0/self_attention/view_out"))

    return _model(g, core)


def _build_heads(g: _Graph, core: BatchedCore) -> onnx.ModelProto:
    """The same core on 4-D [B, H, S, T] scores (no views): Falcon's ALiBi attention."""
    q = g.op("Mul", "Q", g.const(core.scale)) if core.scale_at == "q" else "Q"
    scores = g.op("MatMul", q, g.op("Transpose", "K", perm=[0, 1, 3, 2]))
    if core.bias in ("before-scale", "both"):
        scores = g.op("Add", scores, _alibi(g, core, 0))
    if core.scale_at == "qk-mul":
        scores = g.op("Mul", scores, g.const(core.scale))
    elif core.scale_at == "qk-div":
        scores = g.op("Div", scores, g.const(1 / core.scale))
    if core.bias in ("after-scale", "both"):
        scores = g.op("Add", _alibi(g, core, 1), scores)
    if core.mask.startswith("additive"):
        fill = MIN if core.mask == "additive-min" else -np.inf
        scores = g.op("Add", scores, g.op("Where", _keep(g, core), g.const(0.0), g.const(fill)))
    elif core.mask.startswith("bool-where"):
        fill = MIN if core.mask == "bool-where-min" else -np.inf
        scores = g.op("Where", _keep(g, core), scores, g.const(fill))
    probs = g.op("Softmax", scores, axis=-1)
    if core.guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    if core.casts:
        probs = g.op("Cast", g.op("Cast", probs, to=TensorProto.FLOAT), to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("MatMul", [probs, "V"], ["Y"], name="/h.0/self_attention/MatMul_out"))
    return _model(g, core)


def _model(g: _Graph, core: BatchedCore) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("Q", f, ["B", core.heads, "S", core.head_dim]),
        helper.make_tensor_value_info("K", f, ["B", core.heads, "T", core.head_dim]),
        helper.make_tensor_value_info("V", f, ["B", core.heads, "T", core.head_dim]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
    ]
    used = {name for node in g.nodes for name in node.input}
    inputs = [x for x in inputs if x.name in used]
    outputs = [helper.make_tensor_value_info("Y", f, None)]
    graph = helper.make_graph(g.nodes, "batched_core", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


@st.composite
def batched_feeds(draw: st.DrawFn, core: BatchedCore, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs with any sizes (T >= S); the mask may hide whole rows."""
    b, s = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    t = s + draw(st.integers(0, 2))
    floats = st.floats(-3, 3, width=32, allow_subnormal=False)

    def tensor(shape):
        return draw(hnp.arrays(np.float32, shape, elements=floats))

    out = {
        "Q": tensor((b, core.heads, s, core.head_dim)),
        "K": tensor((b, core.heads, t, core.head_dim)),
        "V": tensor((b, core.heads, t, core.head_dim)),
        "attention_mask": draw(hnp.arrays(np.int64, (b, t), elements=st.integers(0, 1))),
        "input_ids": draw(hnp.arrays(np.int64, (b, t), elements=st.integers(0, 50))),
    }
    names = {x.name for x in model.graph.input}
    return {k: v for k, v in out.items() if k in names}

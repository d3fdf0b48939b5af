"""Attention cores written the ways exporters write them, drawn by hypothesis.

``cores()`` draws the sizes and every variant the fusion must recognize
(scale placement, key transposition, repeat_kv, mask kind, NaN guard,
soft-cap) and, sometimes, one change that makes the subgraph *not* an
attention core the canonical op can express (``broken``). ``build`` writes
it as an opset-23 model with symbolic batch/sequence dims and shape
arithmetic read from ``Shape`` at run time, as the exporters do.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

BROKEN = ("softmax-axis", "tiled-repeat", "per-head-scale")


@dataclasses.dataclass(frozen=True)
class Core:
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    scale_at: str          # q, k, both, qk-mul, qk-div
    key_transpose: str     # direct, reshape
    mask: str              # none, additive-min, additive-inf, bool-where
    guard: bool
    softcap: float | None
    broken: str | None

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads


@st.composite
def cores(draw: st.DrawFn, broken: bool | None = None) -> Core:
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8]))
    scale = draw(st.sampled_from([1 / np.sqrt(head_dim), 0.3]))
    if broken is None:
        broken = draw(st.booleans())
    kind = draw(st.sampled_from(BROKEN)) if broken else None
    if kind == "tiled-repeat" and (kv_heads == 1 or heads == kv_heads):
        kv_heads, heads = 2, 4  # tiling differs from repeat_interleave only here
    return Core(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=float(scale),
        scale_at=draw(st.sampled_from(["q", "k", "both", "qk-mul", "qk-div"])),
        key_transpose=draw(st.sampled_from(["direct", "reshape"])),
        mask=draw(st.sampled_from(["none", "additive-min", "additive-inf", "bool-where"])),
        guard=draw(st.booleans()),
        softcap=draw(st.sampled_from([None, 2.5])),
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

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"/layers.0/attn/{op_type}_{self.count}", **attrs))
        return out

    def shape(self, x: str, start: int, end: int) -> str:
        return self.op("Shape", x, start=start, end=end)


def _repeat(g: _Graph, x: str, core: Core) -> str:
    """repeat_kv the way the exporters write it; ``tiled-repeat`` repeats whole head groups instead."""
    axis = 1 if core.broken == "tiled-repeat" else 2
    n = g.const([core.n_rep], np.int64)
    unsq = g.op("Unsqueeze", x, g.const([axis], np.int64))
    if axis == 2:
        target = g.op("Concat", g.shape(x, 0, 2), n, g.shape(x, 2, 4), axis=0)
    else:
        target = g.op("Concat", g.shape(x, 0, 1), n, g.shape(x, 1, 4), axis=0)
    expanded = g.op("Expand", unsq, target)
    merged = g.op("Concat", g.shape(x, 0, 1), g.const([core.heads], np.int64), g.shape(x, 2, 4), axis=0)
    return g.op("Reshape", expanded, merged)


def _transpose_key(g: _Graph, k: str, how: str) -> str:
    if how == "direct":
        return g.op("Transpose", k, perm=[0, 1, 3, 2])
    flat = g.op("Reshape", k, g.op("Concat", g.const([-1], np.int64), g.shape(k, 2, 4), axis=0))
    swapped = g.op("Transpose", flat, perm=[0, 2, 1])
    back = g.op("Concat", g.shape(k, 0, 2), g.shape(k, 3, 4), g.shape(k, 2, 3), axis=0)
    return g.op("Reshape", swapped, back)


def build(core: Core) -> onnx.ModelProto:
    g = _Graph()
    q, k, v = "Q", "K", "V"
    if core.n_rep > 1 or core.broken == "tiled-repeat":
        k, v = _repeat(g, k, core), _repeat(g, v, core)
    root = float(np.sqrt(core.scale))
    if core.scale_at == "q":
        q = g.op("Mul", q, g.const(core.scale))
    elif core.scale_at == "both":
        q = g.op("Mul", q, g.const(root))
        k = g.op("Div", k, g.const(1 / root))
    kt = _transpose_key(g, k, core.key_transpose)
    if core.scale_at == "k":
        kt = g.op("Mul", g.const(core.scale), kt)
    scores = g.op("MatMul", q, kt)
    if core.scale_at == "qk-mul":
        scores = g.op("Mul", scores, g.const(core.scale))
    elif core.scale_at == "qk-div":
        scores = g.op("Div", scores, g.const(1 / core.scale))
    if core.broken == "per-head-scale":
        per_head = np.linspace(0.5, 1.5, core.heads, dtype=np.float32).reshape(1, core.heads, 1, 1)
        scores = g.op("Mul", scores, g.const(per_head))
    if core.softcap:
        cap = g.const(core.softcap)
        scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, cap)), cap)
    if core.mask.startswith("additive"):
        fill = np.finfo(np.float32).min if core.mask == "additive-min" else -np.inf
        additive = g.op("Where", "keep", g.const(0.0), g.const(fill))
        scores = g.op("Add", additive, scores)
    elif core.mask == "bool-where":
        scores = g.op("Where", "keep", scores, g.const(-np.inf))
    probs = g.op("Softmax", scores, axis=2 if core.broken == "softmax-axis" else -1)
    if core.guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    g.nodes.append(helper.make_node("MatMul", [probs, v], ["Y"], name="/layers.0/attn/MatMul_out"))

    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("Q", f, ["B", core.heads, "S", core.head_dim]),
        helper.make_tensor_value_info("K", f, ["B", core.kv_heads, "T", core.head_dim]),
        helper.make_tensor_value_info("V", f, ["B", core.kv_heads, "T", core.head_dim]),
    ]
    if core.mask != "none":
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, ["B", 1, "S", "T"]))
    outputs = [helper.make_tensor_value_info("Y", f, None)]
    graph = helper.make_graph(g.nodes, "core", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


@st.composite
def feeds(draw: st.DrawFn, core: Core) -> dict[str, np.ndarray]:
    """Inputs with any batch/sequence sizes; the mask may leave whole rows masked."""
    b, s, t = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    floats = st.floats(-3, 3, width=32, allow_subnormal=False)

    def tensor(shape):
        return draw(hnp.arrays(np.float32, shape, elements=floats))

    out = {
        "Q": tensor((b, core.heads, s, core.head_dim)),
        "K": tensor((b, core.kv_heads, t, core.head_dim)),
        "V": tensor((b, core.kv_heads, t, core.head_dim)),
    }
    if core.mask != "none":
        out["keep"] = draw(hnp.arrays(np.bool_, (b, 1, s, t)))
    return out

"""Small graphs and numpy references for the fp16-clip and fp16-emulate tests.

The references are written from the definitions (what fp16 conversion does
to a number, what clipping must do), never from the passes' code.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from hypothesis import strategies as st

from qgraph.verify.runner import OrtRunner

F32 = ir.DataType.FLOAT
FP16_MAX = 65504.0
FP16_OVERFLOW = 65520.0  # fp16 rounds |x| >= 65520 to inf (half-way to 2**16)
SMALLEST_SUBNORMAL = 2.0**-24
F32_MAX = float(np.finfo(np.float32).max)

SITES = (
    "initializer",
    "constant-value",
    "constant-value-float",
    "constant-value-floats",
    "constant-of-shape",
    "if-branch",
    "if-branch-initializer",
    "function",
)


def expected_clip(values: np.ndarray, *, flush: bool) -> np.ndarray:
    """What fp16-clip must make of a float32 constant, elementwise from the issue's rules.

    NaN untouched, ±inf kept (mask semantics), finite |x| > 65504 -> ±65504,
    and with ``flush`` 0 < |x| < 2**-24 -> ±0.
    """
    x = np.array(values, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        beyond = np.isfinite(x) & (np.abs(x) > FP16_MAX)
        tiny = (np.abs(x) > 0) & (np.abs(x) < SMALLEST_SUBNORMAL)
    out = np.where(beyond, np.where(x > 0, np.float32(FP16_MAX), np.float32(-FP16_MAX)), x)
    if flush:
        out = np.where(tiny, np.where(x > 0, np.float32(0.0), np.float32(-0.0)), out)
    return out.astype(np.float32)


def round_fp16(x: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 -> fp32, what an fp16 device stores."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


# hypothesis: float32 constants across every regime the pass distinguishes
_REGIMES = st.one_of(
    st.floats(-FP16_MAX, FP16_MAX, width=32),
    st.floats(FP16_MAX, F32_MAX, width=32, exclude_min=True).flatmap(lambda v: st.sampled_from([v, -v])),
    st.sampled_from([np.float32(np.finfo(np.float32).min), 65504.0, -65504.0, 65505.0, 65519.0, 65520.0]),
    st.floats(-SMALLEST_SUBNORMAL, SMALLEST_SUBNORMAL, width=32),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 0.0, -0.0]),
)


def constant_arrays(max_size: int = 12) -> st.SearchStrategy[np.ndarray]:
    return st.lists(_REGIMES, min_size=1, max_size=max_size).map(lambda v: np.array(v, dtype=np.float32))


# ----------------------------------------------------------------- models


def _model(graph: ir.Graph, functions: tuple[ir.Function, ...] = ()) -> ir.Model:
    return ir.Model(graph, ir_version=10, functions=functions)


def constant_site_model(site: str, values: np.ndarray) -> ir.Model:
    """A model whose output ``y`` is the float32 constant ``values`` placed at ``site``.

    For the scalar-only sites (``constant-value-float``, ``constant-of-shape``)
    only ``values[0]`` is used.
    """
    opsets = {"": 18}
    values = np.asarray(values, dtype=np.float32)
    if site == "initializer":
        c = ir.Value(name="c", type=ir.TensorType(F32), shape=ir.Shape(values.shape), const_value=ir.tensor(values, name="c"))
        node = ir.node("Identity", [c], name="out")
        node.outputs[0].name = "y"
        graph = ir.Graph([], [node.outputs[0]], nodes=[node], initializers=[c], opset_imports=opsets)
        return _model(graph)
    if site in ("constant-value", "constant-value-float", "constant-value-floats"):
        attrs = {
            "constant-value": {"value": ir.tensor(values)},
            "constant-value-float": {"value_float": float(values[0])},
            "constant-value-floats": {"value_floats": [float(v) for v in values]},
        }[site]
        node = ir.node("Constant", [], attributes=attrs, name="const")
        node.outputs[0].name = "y"
        return _model(ir.Graph([], [node.outputs[0]], nodes=[node], opset_imports=opsets))
    if site == "constant-of-shape":
        shape = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([3], dtype=np.int64))}, name="shape")
        fill = ir.node("ConstantOfShape", shape.outputs, attributes={"value": ir.tensor(values[:1])}, name="fill")
        fill.outputs[0].name = "y"
        return _model(ir.Graph([], [fill.outputs[0]], nodes=[shape, fill], opset_imports=opsets))
    if site == "if-branch":
        cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
        then_c = ir.node("Constant", [], attributes={"value": ir.tensor(values)}, name="then_const")
        then_c.outputs[0].name = "then_y"
        else_c = ir.node("Constant", [], attributes={"value": ir.tensor(values)}, name="else_const")
        else_c.outputs[0].name = "else_y"
        then_g = ir.Graph([], [then_c.outputs[0]], nodes=[then_c], name="then_branch")
        else_g = ir.Graph([], [else_c.outputs[0]], nodes=[else_c], name="else_branch")
        branch = ir.node("If", [cond], attributes={"then_branch": then_g, "else_branch": else_g}, name="if")
        branch.outputs[0].name = "y"
        return _model(ir.Graph([cond], [branch.outputs[0]], nodes=[branch], opset_imports=opsets))
    if site == "if-branch-initializer":
        cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
        branches = {}
        for branch_name in ("then_branch", "else_branch"):
            c = ir.Value(name=f"{branch_name}_c", type=ir.TensorType(F32), shape=ir.Shape(values.shape),
                         const_value=ir.tensor(values, name=f"{branch_name}_c"))
            copy = ir.node("Identity", [c], name=f"{branch_name}_identity")
            copy.outputs[0].name = f"{branch_name}_y"
            branches[branch_name] = ir.Graph([], [copy.outputs[0]], nodes=[copy], initializers=[c], name=branch_name)
        branch = ir.node("If", [cond], attributes=branches, name="if")
        branch.outputs[0].name = "y"
        return _model(ir.Graph([cond], [branch.outputs[0]], nodes=[branch], opset_imports=opsets))
    if site == "function":
        inner = ir.node("Constant", [], attributes={"value": ir.tensor(values)}, name="fn_const")
        body = ir.Graph([], [inner.outputs[0]], nodes=[inner], opset_imports={"": 18})
        function = ir.Function("test.fp16", "MakeConstant", "", graph=body, attributes=[])
        call = ir.node("MakeConstant", [], domain="test.fp16", name="call")
        call.outputs[0].name = "y"
        graph = ir.Graph([], [call.outputs[0]], nodes=[call], opset_imports={"": 18, "test.fp16": 1})
        return _model(graph, (function,))
    raise ValueError(site)


def site_feeds(site: str) -> list[dict[str, np.ndarray]]:
    """Feeds that reach every copy of the constant (both branches of an If)."""
    if site.startswith("if-branch"):
        return [{"cond": np.array(True)}, {"cond": np.array(False)}]
    return [{}]


def copies(site: str) -> int:
    """How many constant tensors ``constant_site_model`` places (an If has one per branch)."""
    return 2 if site.startswith("if-branch") else 1


def masked_attention_model(fill: float, *, additive: bool) -> ir.Model:
    """``softmax(scores masked by fill) @ v``, the way exporters build the attention core.

    ``additive``: ``scores + Where(keep, 0, fill)`` (eager attention);
    otherwise ``Where(keep, scores, fill)`` (SDPA's masked_fill).
    """
    b, s, d = "B", "S", 4
    scores = ir.Value(name="scores", type=ir.TensorType(F32), shape=ir.Shape([b, s, s]))
    keep = ir.Value(name="keep", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([b, s, s]))
    v = ir.Value(name="v", type=ir.TensorType(F32), shape=ir.Shape([b, s, d]))
    fill_v = ir.Value(name="fill", type=ir.TensorType(F32), shape=ir.Shape([]),
                      const_value=ir.tensor(np.array(fill, dtype=np.float32), name="fill"))
    zero = ir.Value(name="zero", type=ir.TensorType(F32), shape=ir.Shape([]),
                    const_value=ir.tensor(np.array(0.0, dtype=np.float32), name="zero"))
    if additive:
        bias = ir.node("Where", [keep, zero, fill_v], name="mask_bias")
        masked = ir.node("Add", [scores, bias.outputs[0]], name="masked")
        nodes = [bias, masked]
    else:
        masked = ir.node("Where", [keep, scores, fill_v], name="masked")
        nodes = [masked]
    probs = ir.node("Softmax", [masked.outputs[0]], attributes={"axis": -1}, name="probs")
    out = ir.node("MatMul", [probs.outputs[0], v], name="attend")
    out.outputs[0].name = "y"
    graph = ir.Graph([scores, keep, v], [out.outputs[0]], nodes=[*nodes, probs, out],
                     initializers=[fill_v, zero], opset_imports={"": 18})
    return _model(graph)


def scale_chain_model(scales: list[float]) -> ir.Model:
    """``y = tanh(x * s0 * s1 * ...)``: each product is one producer whose range depends on x."""
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape(["N"]))
    nodes, inits, current = [], [], x
    for i, scale in enumerate(scales):
        s = ir.Value(name=f"s{i}", type=ir.TensorType(F32), shape=ir.Shape([]),
                     const_value=ir.tensor(np.array(scale, dtype=np.float32), name=f"s{i}"))
        inits.append(s)
        mul = ir.node("Mul", [current, s], name=f"mul{i}")
        mul.outputs[0].name = f"h{i}"
        nodes.append(mul)
        current = mul.outputs[0]
    tanh = ir.node("Tanh", [current], name="tanh")
    tanh.outputs[0].name = "y"
    nodes.append(tanh)
    return _model(ir.Graph([x], [tanh.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 18}))


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with OrtRunner(model) as runner:
        return runner.run(feeds)

"""Small graphs holding one RMSNorm, written in every way exporters write it, and near-misses.

``rms_norm_specs()`` draws a ``Spec``; ``build(spec)`` turns it into an
onnx model: ``x = a + b`` (so x also feeds the residual), the RMSNorm of x
in the drawn spelling, then ``out = norm + x``. A spec with a ``flaw`` is
RMSNorm-looking but must not be fused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

FLAWS = (
    "reduce-other-axis",  # the mean runs over axis -2
    "vector-eps",  # epsilon has one value per channel
    "eps-input",  # epsilon is a graph input, not a constant
    "shared-rms",  # the rms intermediate is also a graph output
    "broadcasting-scale",  # the scale [1, ..., 1, H] has a higher rank than x
)


@dataclasses.dataclass(frozen=True)
class Spec:
    dtype: str = "float32"  # of x, the scale and the output
    upcast: bool = False  # Cast x to float32 first (and back, Llama); a no-op Cast on float32, as TorchScript emits
    square: str = "pow"  # pow | mul
    inverse: str = "reciprocal"  # reciprocal | div-one | pow-neg-half | div
    # weight (Llama) | one-plus-weight (Gemma) | activation (the scale is a graph input)
    # | one-plus-activation (Gemma's form with w a graph input: nothing to fold)
    scale_form: str = "weight"
    scale_first: bool = True  # Mul(scale, norm) or Mul(norm, scale)
    x_first: bool = True  # Mul(x, inv) or Mul(inv, x); Add(mean, eps) or Add(eps, mean)
    eps: float = 1e-5
    eps_rank: int = 0
    heads: int | None = None  # q/k norm: x is [B, S, heads, head_dim]
    hidden: int = 8
    opset: int = 23  # 17: axes as an attribute (TorchScript) and no value types
    flaw: str | None = None

    @property
    def fusable(self) -> bool:
        return self.flaw is None


@st.composite
def rms_norm_specs(draw: st.DrawFn, flaws: bool = True, opset: int | None = None) -> Spec:
    dtype = draw(st.sampled_from(["float32", "float16"]))
    return Spec(
        dtype=dtype,
        upcast=draw(st.booleans()),
        square=draw(st.sampled_from(["pow", "mul"])),
        inverse=draw(st.sampled_from(["reciprocal", "div-one", "pow-neg-half", "div"])),
        scale_form=draw(st.sampled_from(["weight", "one-plus-weight", "activation", "one-plus-activation"])),
        scale_first=draw(st.booleans()),
        x_first=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        eps_rank=draw(st.integers(0, 1)),
        heads=draw(st.sampled_from([None, 2])),
        hidden=draw(st.sampled_from([4, 8])),
        opset=opset if opset is not None else draw(st.sampled_from([17, 23])),
        flaw=draw(st.sampled_from([None, *FLAWS])) if flaws else None,
    )


def _elem(dtype: str) -> int:
    return TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{len(self.nodes)}", **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name


def build(spec: Spec) -> onnx.ModelProto:
    g = _Graph()
    io_type = _elem(spec.dtype)
    compute = "float32" if spec.upcast else spec.dtype
    shape = ["B", "S", spec.heads, spec.hidden] if spec.heads else ["B", "S", spec.hidden]
    for name in ("a", "b"):
        g.inputs.append(helper.make_tensor_value_info(name, io_type, shape))
    x = g.op("Add", "a", "b")
    x_up = g.op("Cast", x, to=TensorProto.FLOAT) if spec.upcast else x

    square = g.op("Pow", x_up, g.const("two", np.array(2.0, dtype=compute))) if spec.square == "pow" else g.op("Mul", x_up, x_up)
    axes = [-2] if spec.flaw == "reduce-other-axis" else [-1]
    if spec.opset >= 18:
        mean = g.op("ReduceMean", square, g.const("axes", np.array(axes, dtype=np.int64)), keepdims=1)
    else:
        mean = g.op("ReduceMean", square, axes=axes, keepdims=1)
    if spec.flaw == "eps-input":
        g.inputs.append(helper.make_tensor_value_info("eps", _elem(compute), []))
        eps = "eps"
    else:
        eps_shape = (spec.hidden,) if spec.flaw == "vector-eps" else (1,) * spec.eps_rank
        eps = g.const("eps", np.full(eps_shape, spec.eps, dtype=compute))
    var_eps = g.op("Add", *((mean, eps) if spec.x_first else (eps, mean)))
    if spec.inverse == "pow-neg-half":
        rms = inv = g.op("Pow", var_eps, g.const("neg_half", np.array(-0.5, dtype=compute)))
    else:
        rms = g.op("Sqrt", var_eps)
        if spec.inverse == "reciprocal":
            inv = g.op("Reciprocal", rms)
        elif spec.inverse == "div-one":
            inv = g.op("Div", g.const("one", np.array(1.0, dtype=compute)), rms)
    if spec.inverse == "div":
        norm = g.op("Div", x_up, rms)
    else:
        norm = g.op("Mul", *((x_up, inv) if spec.x_first else (inv, x_up)))
    if spec.flaw == "shared-rms":
        g.outputs.append(helper.make_tensor_value_info(rms, _elem(compute), [*shape[:-1], 1]))

    rng = np.random.default_rng(spec.hidden)
    scale_shape = (1,) * len(shape) + (spec.hidden,) if spec.flaw == "broadcasting-scale" else (spec.hidden,)
    if spec.scale_form in ("one-plus-weight", "one-plus-activation"):
        # Gemma: x.float() ... * (1 + w.float()), and .type_as(x) after the scale.
        if spec.scale_form == "one-plus-weight":
            w = g.const("w", rng.uniform(-0.5, 0.5, scale_shape).astype(spec.dtype))
        else:
            g.inputs.append(helper.make_tensor_value_info("w", io_type, scale_shape))
            w = "w"
        w_up = g.op("Cast", w, to=TensorProto.FLOAT) if spec.upcast else w
        one_plus = g.op("Add", g.const("one_w", np.array(1.0, dtype=compute)), w_up)
        scaled = g.op("Mul", *((one_plus, norm) if spec.scale_first else (norm, one_plus)))
        y = g.op("Cast", scaled, to=io_type) if spec.upcast else scaled
    else:
        # Llama: weight * hidden.to(input_dtype).
        norm_out = g.op("Cast", norm, to=io_type) if spec.upcast else norm
        if spec.scale_form == "weight":
            scale = g.const("weight", rng.uniform(-2, 2, scale_shape).astype(spec.dtype))
        else:
            g.inputs.append(helper.make_tensor_value_info("scale", io_type, scale_shape))
            scale = "scale"
        y = g.op("Mul", *((scale, norm_out) if spec.scale_first else (norm_out, scale)))
    out = g.op("Add", y, x)
    out_shape = [1, *shape] if spec.flaw == "broadcasting-scale" else shape
    g.outputs.insert(0, helper.make_tensor_value_info(out, io_type, out_shape))
    graph = helper.make_graph(g.nodes, "rmsnorm_case", g.inputs, g.outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=10)
    if spec.opset >= 18:
        model = onnx.shape_inference.infer_shapes(model)  # as the dynamo exporter: values typed
    onnx.checker.check_model(model)
    return model

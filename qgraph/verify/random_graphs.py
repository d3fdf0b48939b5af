"""Random valid ONNX graphs for fuzzing passes: a hypothesis strategy, so failures shrink.

Every graph is a DAG over values of one shape, ``[batch, width]`` with a
symbolic batch, so any elementwise op can combine any two values of a
dtype; the interesting structure comes from what passes look for:
duplicated subexpressions (cse), unused nodes (dce), Identity chains,
constant subexpressions (constant folding), an RMSNorm written out in
primitives (rmsnorm), MatMul with weights, reductions broadcast back,
Transpose/Reshape round trips, fp16 islands between Casts, int64
arithmetic, an ``If`` whose branches read the outer scope, and a
model-local function. Values stay in ranges where fp32 and fp16 results are
stable (no Exp, divisions by ``|b| + 1``), so a difference between two
graphs is a difference in meaning. :func:`random_feeds` draws inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

__all__ = ["RandomGraph", "random_feeds", "random_graphs"]

_FLOAT, _HALF, _INT = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
_NP = {_FLOAT: np.float32, _HALF: np.float16, _INT: np.int64}
_LOCAL_DOMAIN = "fuzz.local"


@dataclasses.dataclass
class RandomGraph:
    """A drawn model and what its inputs are: name -> (dtype, width)."""

    model: onnx.ModelProto
    inputs: dict[str, int]
    width: int
    kinds: list[str]  # the constructs drawn, for the fuzz counts


class _Builder:
    def __init__(self, width: int, opset: int) -> None:
        self.width, self.opset = width, opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.values: dict[int, list[str]] = {_FLOAT: [], _HALF: [], _INT: []}
        self.count = 0
        self.uses_function = False

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def node(self, op: str, inputs: list[str], dtype: int | None, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name("n"), **attrs))
        if dtype is not None:
            self.values[dtype].append(out)
        return out

    def constant(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name


_UNARY = ["Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Identity", "Floor"]
_BINARY = ["Add", "Sub", "Mul", "Max", "Min"]
_KINDS = [
    "unary", "binary", "divide", "softmax", "matmul", "reduce-broadcast", "transpose-twice", "reshape",
    "where", "fp16-island", "rmsnorm", "constant-subexpression", "identity-chain", "duplicate", "dead-code",
    "int64", "if", "function",
]


def _step(draw, b: _Builder, kind: str) -> None:
    floats = b.values[_FLOAT]
    pick = lambda pool: draw(st.sampled_from(pool))  # noqa: E731 - a one-line helper
    x = pick(floats)
    w = b.width
    if kind == "unary":
        b.node(pick(_UNARY), [x], _FLOAT)
    elif kind == "binary":
        b.node(pick(_BINARY), [x, pick(floats)], _FLOAT)
    elif kind == "divide":
        one = b.constant(np.ones([1], np.float32), "one")
        b.node("Div", [x, b.node("Add", [b.node("Abs", [pick(floats)], None), one], None)], _FLOAT)
    elif kind == "softmax":
        b.node("Softmax", [x], _FLOAT, axis=-1)
    elif kind == "matmul":
        seed = draw(st.integers(0, 2**16))
        weight = np.random.default_rng(seed).uniform(-1, 1, [w, w]).astype(np.float32) / w
        b.node("MatMul", [x, b.constant(weight, "w")], _FLOAT)
    elif kind == "reduce-broadcast":
        if b.opset >= 18:
            mean = b.node("ReduceMean", [x, b.constant(np.array([-1], np.int64), "axes")], None, keepdims=1)
        else:
            mean = b.node("ReduceMean", [x], None, axes=[-1], keepdims=1)
        b.node("Sub", [x, mean], _FLOAT)
    elif kind == "transpose-twice":
        b.node("Transpose", [b.node("Transpose", [x], None, perm=[1, 0])], _FLOAT, perm=[1, 0])
    elif kind == "reshape":
        b.node("Reshape", [x, b.constant(np.array([-1, w], np.int64), "shape")], _FLOAT)
    elif kind == "where":
        y = pick(floats)
        b.node("Where", [b.node("Greater", [x, y], None), x, y], _FLOAT)
    elif kind == "fp16-island":
        half = b.node("Cast", [x], _HALF, to=_HALF)
        inner = b.node(pick(["Relu", "Neg", "Abs", "Tanh"]), [half], _HALF)
        b.node("Cast", [b.node("Add", [inner, pick(b.values[_HALF])], _HALF)], _FLOAT, to=_FLOAT)
    elif kind == "rmsnorm":
        eps = b.constant(np.array(1e-5, np.float32), "eps")
        mean_sq = (b.node("ReduceMean", [b.node("Mul", [x, x], None), b.constant(np.array([-1], np.int64), "axes")], None, keepdims=1)
                   if b.opset >= 18 else b.node("ReduceMean", [b.node("Mul", [x, x], None)], None, axes=[-1], keepdims=1))
        normed = b.node("Div", [x, b.node("Sqrt", [b.node("Add", [mean_sq, eps], None)], None)], None)
        scale = np.linspace(0.5, 1.5, w).astype(np.float32)
        b.node("Mul", [normed, b.constant(scale, "gamma")], _FLOAT)
    elif kind == "constant-subexpression":
        a = b.constant(np.full([w], draw(st.floats(-2, 2, width=32)), np.float32))
        c = b.constant(np.full([w], draw(st.floats(-2, 2, width=32)), np.float32))
        b.node(pick(["Add", "Mul"]), [x, b.node(pick(["Add", "Mul", "Sub"]), [a, c], None)], _FLOAT)
    elif kind == "identity-chain":
        value = x
        for _ in range(draw(st.integers(1, 3))):
            value = b.node("Identity", [value], None)
        b.values[_FLOAT].append(value)
    elif kind == "duplicate":
        op, y = pick(_BINARY), pick(floats)
        first, second = b.node(op, [x, y], None), b.node(op, [x, y], None)
        b.node("Add", [first, second], _FLOAT)
    elif kind == "dead-code":
        b.node(pick(_UNARY), [b.node(pick(_BINARY), [x, pick(floats)], None)], None)
    elif kind == "int64":
        ints = b.values[_INT]
        i = b.node(pick(["Add", "Mul", "Sub", "Max"]), [pick(ints), pick(ints)], _INT)
        b.node("Add", [x, b.node("Cast", [b.node("Abs", [i], None)], None, to=_FLOAT)], _FLOAT)
    elif kind == "if":
        cond = b.constant(np.array(draw(st.booleans())), "cond")
        out_then, out_else = b.name("then_out"), b.name("else_out")
        info = lambda n: helper.make_tensor_value_info(n, _FLOAT, None)  # noqa: E731
        then_g = helper.make_graph([helper.make_node("Relu", [x], [out_then])], b.name("then"), [], [info(out_then)])
        else_g = helper.make_graph([helper.make_node("Neg", [x], [out_else])], b.name("else"), [], [info(out_else)])
        b.node("If", [cond], _FLOAT, then_branch=then_g, else_branch=else_g)
    elif kind == "function":
        b.uses_function = True
        b.nodes.append(helper.make_node("ReluNeg", [x], [out := b.name("fn")], domain=_LOCAL_DOMAIN, name=b.name("n")))
        b.values[_FLOAT].append(out)


def _function(opset: int) -> onnx.FunctionProto:
    return helper.make_function(
        _LOCAL_DOMAIN, "ReluNeg", ["x"], ["y"],
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
        [helper.make_opsetid("", opset)],
    )


@st.composite
def random_graphs(draw, max_steps: int = 10) -> RandomGraph:
    """A random valid model (see the module docstring) with 1-3 inputs and 1-2 outputs."""
    opset = draw(st.sampled_from([17, 18]))
    width = draw(st.integers(2, 5))
    b = _Builder(width, opset)
    inputs: dict[str, int] = {}
    for i in range(draw(st.integers(1, 2))):
        inputs[f"x{i}"] = _FLOAT
        b.values[_FLOAT].append(f"x{i}")
    if draw(st.booleans()):
        inputs["h"] = _HALF
        b.values[_HALF].append("h")
    if draw(st.booleans()):
        inputs["ids"] = _INT
        b.values[_INT].append("ids")
    kinds = [k for k in _KINDS if (k != "fp16-island" or b.values[_HALF]) and (k != "int64" or b.values[_INT])]
    drawn = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=max_steps))
    for kind in drawn:
        _step(draw, b, kind)
    live = [v for v in b.values[_FLOAT] if v not in inputs]
    outputs = [live[-1]] if live else [b.node("Identity", [b.values[_FLOAT][0]], _FLOAT)]
    if len(live) > 2 and draw(st.booleans()):
        outputs.append(draw(st.sampled_from(live[:-1])))
    shape = ["batch", width]
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info(n, t, shape) for n, t in inputs.items()],
        [helper.make_tensor_value_info(n, _FLOAT, shape) for n in dict.fromkeys(outputs)],
        b.initializers,
    )
    imports = [helper.make_opsetid("", opset)]
    functions = []
    if b.uses_function:
        imports.append(helper.make_opsetid(_LOCAL_DOMAIN, 1))
        functions.append(_function(opset))
    model = helper.make_model(graph, opset_imports=imports, functions=functions, ir_version=8)
    return RandomGraph(model, inputs, width, drawn)


def random_feeds(graph: RandomGraph) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Inputs for ``graph``: one batch size for all, values in [-4, 4] (int64 in [-50, 50])."""

    @st.composite
    def feeds(draw) -> dict[str, np.ndarray]:
        batch = draw(st.integers(1, 3))
        out = {}
        for name, dtype in graph.inputs.items():
            if dtype == _INT:
                elements = st.integers(-50, 50)
            else:
                elements = st.floats(-4, 4, width=16 if dtype == _HALF else 32)
            out[name] = draw(hnp.arrays(_NP[dtype], (batch, graph.width), elements=elements))
        return out

    return feeds()

"""Small graph builders for the rewrite-engine tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort

FLOAT = ir.DataType.FLOAT


class GraphBuilder:
    """``op.Add(a, b, axis=1, _domain=..., _outputs=n)`` on an onnx_ir Tape."""

    def __init__(self, graph: ir.Graph) -> None:
        self.tape = ir.tape.Tape(graph)

    def initializer(self, tensor: ir.TensorProtocol) -> ir.Value:
        return self.tape.initializer(tensor)

    def __getattr__(self, op_type: str):
        def make(*inputs, _domain: str = "", _outputs: int = 1, **attrs):
            if _outputs == 1:
                return self.tape.op(op_type, list(inputs), attrs, domain=_domain)
            return self.tape.op_multi_out(op_type, list(inputs), attrs, domain=_domain, num_outputs=_outputs)

        return make


def make_model(
    build: Callable[..., ir.Value | Sequence[ir.Value]],
    inputs: dict[str, tuple[ir.DataType, Sequence[int | str]]],
    *,
    opset: int = 23,
    extra_opsets: dict[str, int] | None = None,
) -> ir.Model:
    """Build a model from ``build(op, *inputs)`` written against onnx_ir's Builder."""
    values = [ir.val(name, dtype, ir.Shape(shape)) for name, (dtype, shape) in inputs.items()]
    graph = ir.Graph(values, [], nodes=[], opset_imports={"": opset, **(extra_opsets or {})}, name="g")
    op = GraphBuilder(graph)
    result = build(op, *values)
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    for i, out in enumerate(outputs):
        if out.name is None:
            out.name = f"out{i}"
    graph.outputs.extend(outputs)
    model = ir.Model(graph, ir_version=10)
    ir.passes.common.ShapeInferencePass()(model)
    return model


def const(op: GraphBuilder, array, name: str) -> ir.Value:
    return op.initializer(ir.tensor(np.asarray(array), name=name))


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]

"""A small node builder for the sampler subgraph, aware of the graph's opset.

The sampler is appended after the logits of a graph whose default-domain
opset can be anything from 16 (ScatterElements with a reduction) to 23:
the reductions take their axes as an attribute before opset 18 and as an
input from 18 on, so the builder writes whichever the graph's opset wants.
Every node it adds is tagged ``qgraph.pass = sampler`` so diagnostics can
say where a value came from.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.node_types import infer_output_types

__all__ = ["Ops"]

_PASS = "sampler"


class Ops:
    """Appends nodes and constants to ``graph`` under fresh ``sampler/...`` names."""

    def __init__(self, graph: ir.Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self._taken = {v.name for v in graph.inputs} | set(graph.initializers)
        for node in graph:
            self._taken |= {v.name for v in node.outputs}
            if node.name:
                self._taken.add(node.name)
        self._count = 0

    def fresh(self, hint: str) -> str:
        while True:
            self._count += 1
            name = f"sampler/{hint}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def const(self, value: object, dtype: type = np.int64) -> ir.Value:
        array = np.asarray(value, dtype=dtype)
        out = ir.Value(name=self.fresh("const"), const_value=ir.tensor(array),
                       type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
        self.graph.register_initializer(out)
        return out

    def op(self, op_type: str, *inputs: ir.Value | None, outputs: int = 1, **attributes: object):
        node = ir.node(op_type, list(inputs), attributes=attributes, name=self.fresh(op_type), num_outputs=outputs)
        node.metadata_props["qgraph.pass"] = _PASS
        self.graph.append(node)
        for out in node.outputs:
            out.name = self.fresh(op_type.lower())
        infer_output_types(node, self.graph.opset_imports)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def reduce(self, op_type: str, x: ir.Value, axes: list[int], keepdims: int = 1) -> ir.Value:
        if self.opset >= 18:
            return self.op(op_type, x, self.const(axes), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: ir.Value, axes: list[int]) -> ir.Value:
        return self.op("Unsqueeze", x, self.const(axes))  # axes as an input since opset 13

    def cast(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        return self.op("Cast", x, to=dtype)

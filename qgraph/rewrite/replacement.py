"""Building a rule's replacement, and checking it against what it replaces.

The replacement function receives a ``ReplacementBuilder`` as ``op``; calls
like ``op.RMSNormalization(x, scale, epsilon=eps)`` create real ``ir.Node``s
that are not yet in any graph. Before the engine splices them in, each new
node's output types are inferred with onnx's per-node inference (no
whole-graph shape inference), and a replacement that would change the dtype
or rank of a value it replaces is rejected: a rewrite must never change what
downstream nodes receive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qgraph.rewrite.schemas import RuleDefinitionError, op_problem

__all__ = ["ReplacementBuilder", "node_attributes"]

_PLAIN_KINDS = (
    (int, ir.AttributeType.INT, ir.AttributeType.INTS),  # bool too, as onnx_ir has it
    (float, ir.AttributeType.FLOAT, ir.AttributeType.FLOATS),
    (str, ir.AttributeType.STRING, ir.AttributeType.STRINGS),
)


def _plain_type(value: Any) -> ir.AttributeType | None:
    """The attribute type onnx_ir infers for a Python number, string or non-empty list of one kind; else None."""
    for kind, one, many in _PLAIN_KINDS:
        if isinstance(value, kind):
            return one
    if isinstance(value, (list, tuple)) and value:
        for kind, _, many in _PLAIN_KINDS:
            if all(isinstance(v, kind) for v in value):
                return many
    return None


def node_attributes(attributes: dict[str, Any]) -> list[ir.Attr]:
    """``ir.convenience.convert_attributes``, with the type of plain Python values given up front.

    onnx_ir infers a list's type only after isinstance checks against its
    runtime Protocols (graph, tensor, type), which cost more than the rest
    of making the node: a replacement with Constant(value_ints=...) slices
    spent a fifth of the rotary pass there. Same attributes either way.
    """
    return [ir.convenience.convert_attribute(name, value, _plain_type(value)) for name, value in attributes.items()]


class ReplacementBuilder:
    """The ``op`` a replacement function receives.

    Reserved keywords: ``_domain``, ``_outputs`` (an int > 1 returns a tuple).
    Python numbers and numpy arrays given as inputs become constants
    (initializers in a main graph, Constant nodes inside functions and
    subgraphs, where initializers are not allowed).
    """

    def __init__(self, *, use_initializers: bool, name_prefix: str, opset: int | None = None) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.domains: set[str] = set()
        self._use_initializers = use_initializers
        self._prefix = name_prefix
        self._opset = opset
        self._count = 0

    def fresh_name(self, hint: str) -> str:
        """A name no other node or value of this replacement has."""
        self._count += 1
        return f"{self._prefix}/{hint}_{self._count}"

    _fresh = fresh_name

    def __getattr__(self, op_type: str) -> Any:
        if op_type.startswith("_") or not op_type[:1].isupper():
            raise AttributeError(op_type)

        def make(*inputs: Any, **kwargs: Any) -> Any:
            domain = kwargs.pop("_domain", "")
            num_outputs = kwargs.pop("_outputs", 1)
            attributes = {k: v for k, v in kwargs.items() if v is not None}
            problem = op_problem(domain, op_type, attributes, self._opset)
            if problem is not None:
                raise RuleDefinitionError(f"replacement {problem}")
            node = ir.Node(
                domain,
                op_type,
                [self._as_value(x) for x in inputs],
                attributes=node_attributes(attributes),
                num_outputs=num_outputs,
                name=self._fresh(op_type),
            )
            self.nodes.append(node)
            self.domains.add(domain)
            return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

        return make

    def const(self, value: Any, dtype: ir.DataType | np.dtype | None = None, name: str | None = None) -> ir.Value:
        """A constant value; numpy dtype rules apply unless ``dtype`` is given."""
        if isinstance(value, ir.TensorProtocol):
            tensor = value
        else:
            array = np.asarray(value)
            if dtype is not None:
                np_dtype = dtype.numpy() if isinstance(dtype, ir.DataType) else np.dtype(dtype)
                array = array.astype(np_dtype)
            elif array.dtype == np.float64:
                array = array.astype(np.float32)
            tensor = ir.tensor(array)
        name = name or self._fresh("const")
        tensor.name = name
        if self._use_initializers:
            value_ = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            self.initializers.append(value_)
            return value_
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)], name=self._fresh("Constant"))
        out = node.outputs[0]
        out.name = name
        out.shape = ir.Shape(tensor.shape)
        out.type = ir.TensorType(tensor.dtype)
        out.const_value = tensor
        self.nodes.append(node)
        return out

    def _as_value(self, x: Any) -> ir.Value | None:
        if x is None or isinstance(x, ir.Value):
            return x
        if isinstance(x, (int, float, bool, np.ndarray, np.number, list, tuple, ir.TensorProtocol)):
            return self.const(x)
        raise TypeError(f"cannot use {x!r} as an op input in a replacement")


def type_change(old: ir.Value, new: ir.Value) -> str | None:
    """Describe a dtype or rank change from ``old`` to ``new``, if any."""
    if old.dtype is not None and new.dtype is not None and old.dtype != new.dtype:
        return f"dtype of '{old.name}' would change from {old.dtype} to {new.dtype}"
    if old.shape is not None and new.shape is not None and len(old.shape) != len(new.shape):
        return f"rank of '{old.name}' would change from {len(old.shape)} to {len(new.shape)}"
    return None


def new_values_in_order(nodes: Sequence[ir.Node]) -> list[ir.Value]:
    return [v for n in nodes for v in n.outputs]

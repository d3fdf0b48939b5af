"""Patterns are written the way the model computes, over an op builder.

A rule author writes an ordinary function::

    def rms_norm(op, x, scale):
        mean_sq = op.ReduceMean(op.Mul(x, x), [-1], keepdims=1)
        return scale * op.Div(x, op.Sqrt(mean_sq + op.const(name="eps")))

Calling it with a ``PatternBuilder`` and one ``Var`` per parameter records a
small DAG of ``NodePattern`` / value patterns instead of computing anything.
The matcher (``matcher.py``) walks that DAG backwards from the returned
value(s). Everything a pattern can say lives in this module:

* op type and domain (``op.Foo(..., _domain="com.microsoft")``);
* attributes: a literal is matched exactly (the op schema's default stands in
  for an omitted attribute), ``op.capture("name")`` binds the value,
  ``op.attr(predicate, name=...)`` tests it;
* commutative inputs declared once (``_commute=True`` on a node, or
  ``commute=True`` on the rule for every commutative op in the pattern): the
  matcher tries both input orders, the rule is never cloned;
* alternatives anywhere, including the returned value (``a | b`` or
  ``op.any_of(a, b, name=...)``);
* optional nodes (``op.optional(op.Cast(x, to=1))`` matches with or without
  the Cast);
* constants by value with a tolerance (plain Python numbers, or
  ``op.const(1e-6, rtol=...)``) or by predicate (``op.const(pred=..., name=...)``);
* weights of any size (``op.weight("w", dtype=..., shape=("H", "H"), pred=...)``):
  an initializer or Constant matched by its dtype and shape, read from disk
  only when a predicate asks for its values, and bound as the graph value so
  the replacement can reuse it;
* dtype / shape / rank conditions on any value, with symbolic dims bound by
  name across the match (``x.where(shape=("B", "S", "H"))``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = [
    "AnyOf",
    "AttrCapture",
    "AttrPredicate",
    "ConstPattern",
    "NodeOutput",
    "NodePattern",
    "PatternBuilder",
    "PatternGraph",
    "ValuePattern",
    "Var",
    "WeightPattern",
    "build_pattern",
]

# Ops whose two inputs may be swapped without changing the result. Declared
# once here so ``commute=True`` on a rule needs no per-node annotation.
COMMUTATIVE_OPS = frozenset(
    {"Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal", "BitwiseAnd",
     "BitwiseOr", "BitwiseXor"}
)

_ids = itertools.count()

# A scalar pattern value (``op.const(1.0)``) also matches a constant whose
# every element equals it; to know that, the constant must be read. Weights
# larger than this are not read for that comparison (every ``Mul(x, W)`` of a
# model would otherwise load ``W``); the matcher reports such a constant as a
# near miss that says so. Values given with their full shape, predicates and
# ``op.weight`` have no size limit.
SCALAR_COMPARISON_LIMIT = 4096


@dataclasses.dataclass(eq=False)
class ValueConstraint:
    """dtype / shape / rank conditions on whatever value a pattern matches.

    ``shape`` entries: an int must equal the dim, a str binds a symbolic dim
    name (the same name must bind the same dim everywhere in one match),
    ``None`` accepts any dim, and a leading ``...`` accepts any number of
    leading dims.
    """

    dtype: ir.DataType | tuple[ir.DataType, ...] | None = None
    shape: tuple[Any, ...] | None = None
    rank: int | None = None


class ValuePattern:
    """A value in a pattern; subclasses say what kind of graph value matches."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self.constraint: ValueConstraint | None = None

    def where(
        self,
        *,
        dtype: ir.DataType | Sequence[ir.DataType] | None = None,
        shape: Sequence[Any] | None = None,
        rank: int | None = None,
    ) -> ValuePattern:
        """Attach dtype/shape/rank conditions; returns self for chaining."""
        if dtype is not None and not isinstance(dtype, ir.DataType):
            dtype = tuple(dtype)
        self.constraint = ValueConstraint(
            dtype=dtype, shape=tuple(shape) if shape is not None else None, rank=rank
        )
        return self

    def __or__(self, other: ValuePattern) -> AnyOf:
        left = self.alternatives if isinstance(self, AnyOf) and self.name is None else (self,)
        return AnyOf((*left, _as_value_pattern(other)))

    # Arithmetic sugar so a pattern can read like the model's Python code.
    def __add__(self, other: Any) -> NodeOutput:
        return _binary("Add", self, other)

    def __radd__(self, other: Any) -> NodeOutput:
        return _binary("Add", other, self)

    def __sub__(self, other: Any) -> NodeOutput:
        return _binary("Sub", self, other)

    def __rsub__(self, other: Any) -> NodeOutput:
        return _binary("Sub", other, self)

    def __mul__(self, other: Any) -> NodeOutput:
        return _binary("Mul", self, other)

    def __rmul__(self, other: Any) -> NodeOutput:
        return _binary("Mul", other, self)

    def __truediv__(self, other: Any) -> NodeOutput:
        return _binary("Div", self, other)

    def __rtruediv__(self, other: Any) -> NodeOutput:
        return _binary("Div", other, self)

    def describe(self) -> str:
        raise NotImplementedError


class Var(ValuePattern):
    """A pattern input: binds any graph value (the same Var, the same value)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def describe(self) -> str:
        return f"variable '{self.name}'"


class ConstPattern(ValuePattern):
    """A constant (initializer or Constant node) tested by value or predicate.

    ``value=None`` and ``pred=None`` accepts any constant without reading it.
    A value is compared after its element count: the constant must have as
    many elements as ``value``, or ``value`` is a scalar and the constant has
    at most ``SCALAR_COMPARISON_LIMIT`` elements (a near miss says so
    otherwise). A predicate reads the constant whatever its size; so does a
    ``name``, which binds the array. ``max_elements`` optionally refuses
    larger constants outright. For weights, ``WeightPattern`` binds the graph
    value instead of its contents.
    """

    def __init__(
        self,
        value: Any = None,
        *,
        rtol: float = 1e-6,
        atol: float = 0.0,
        pred: Callable[[np.ndarray], bool] | None = None,
        name: str | None = None,
        max_elements: int | None = None,
    ) -> None:
        super().__init__()
        self.value = None if value is None else np.asarray(value)
        self.rtol = rtol
        self.atol = atol
        self.pred = pred
        self.name = name
        self.max_elements = max_elements

    def describe(self) -> str:
        if self.value is not None:
            return f"constant {self.value.tolist()!r}"
        return f"constant '{self.name}'" if self.name else "a constant"


class WeightPattern(Var):
    """A weight: a constant graph value matched by dtype, shape and predicate.

    It binds like a variable (``match[name]`` is the ``ir.Value``, so a
    replacement can feed the same initializer to a new node, and a condition
    reads ``value.const_value.numpy()`` only if it needs to). dtype and shape
    come from the tensor's header, so a weight of any size stored on disk is
    matched without being read; ``pred`` receives the array and does read it.
    ``shape`` entries follow ``ValueConstraint`` (ints, dim names bound across
    the match, ``None``).
    """

    def __init__(
        self,
        name: str,
        *,
        dtype: ir.DataType | Sequence[ir.DataType] | None = None,
        shape: Sequence[Any] | None = None,
        pred: Callable[[np.ndarray], bool] | None = None,
    ) -> None:
        super().__init__(name)
        self.dtype = dtype if dtype is None or isinstance(dtype, ir.DataType) else tuple(dtype)
        self.shape = None if shape is None else tuple(shape)
        self.pred = pred

    def describe(self) -> str:
        return f"weight '{self.name}'"


class AnyOf(ValuePattern):
    """Alternatives, tried in order; ``name`` records which one matched."""

    def __init__(self, alternatives: Sequence[ValuePattern], name: str | None = None) -> None:
        super().__init__()
        if len(alternatives) < 2:
            raise ValueError("AnyOf needs at least two alternatives")
        self.alternatives = tuple(alternatives)
        self.name = name

    def describe(self) -> str:
        return "one of (" + " | ".join(a.describe() for a in self.alternatives) + ")"


@dataclasses.dataclass(eq=False)
class AttrCapture:
    """Bind an attribute's value (the schema default when it is omitted)."""

    name: str


@dataclasses.dataclass(eq=False)
class AttrPredicate:
    """Test an attribute's value; ``name`` optionally binds it as well."""

    pred: Callable[[Any], bool]
    name: str | None = None


class NodePattern:
    """One op in a pattern."""

    def __init__(
        self,
        op_type: str,
        domain: str,
        inputs: Sequence[ValuePattern | None],
        attributes: dict[str, Any],
        *,
        num_outputs: int = 1,
        commute: bool = False,
        allow_other_attributes: bool = True,
        name: str | None = None,
    ) -> None:
        self.id = next(_ids)
        self.op_type = op_type
        self.domain = "" if domain == "ai.onnx" else domain
        self.inputs = list(inputs)
        self.attributes = attributes
        self.commute = commute
        self.allow_other_attributes = allow_other_attributes
        self.name = name
        self.outputs = [NodeOutput(self, i) for i in range(num_outputs)]

    @property
    def op_key(self) -> tuple[str, str]:
        return (self.domain, self.op_type)

    def describe(self) -> str:
        qualified = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        return f"{qualified}" + (f" '{self.name}'" if self.name else "")


class NodeOutput(ValuePattern):
    """The ``index``-th output of a pattern node."""

    def __init__(self, node: NodePattern, index: int) -> None:
        super().__init__()
        self.node = node
        self.index = index

    def describe(self) -> str:
        suffix = f" output {self.index}" if len(self.node.outputs) > 1 else ""
        return self.node.describe() + suffix


def _as_value_pattern(x: Any) -> ValuePattern:
    if isinstance(x, ValuePattern):
        return x
    if isinstance(x, (int, float, bool, np.ndarray, np.number, list, tuple)):
        return ConstPattern(x)
    raise TypeError(f"cannot use {x!r} as a pattern value")


def _binary(op_type: str, a: Any, b: Any) -> NodeOutput:
    node = NodePattern(op_type, "", [_as_value_pattern(a), _as_value_pattern(b)], {})
    return node.outputs[0]


class PatternBuilder:
    """The ``op`` a pattern function receives: ``op.Add(a, b)`` records a node.

    Reserved keyword arguments (all prefixed with ``_``): ``_domain``,
    ``_outputs`` (number of outputs; a tuple of patterns is returned when >1),
    ``_commute``, ``_allow_other_attributes``, ``_name`` (a name under which
    the matched ir.Node is captured).
    """

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_") or not op_type[:1].isupper():
            raise AttributeError(op_type)

        def make(*inputs: Any, **kwargs: Any) -> Any:
            domain = kwargs.pop("_domain", "")
            num_outputs = kwargs.pop("_outputs", 1)
            commute = kwargs.pop("_commute", False)
            allow_other = kwargs.pop("_allow_other_attributes", True)
            name = kwargs.pop("_name", None)
            unknown = [k for k in kwargs if k.startswith("_")]
            if unknown:
                raise TypeError(f"unknown pattern keyword(s) {unknown} for {op_type}")
            node = NodePattern(
                op_type,
                domain,
                [None if x is None else _as_value_pattern(x) for x in inputs],
                kwargs,
                num_outputs=num_outputs,
                commute=commute,
                allow_other_attributes=allow_other,
                name=name,
            )
            return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

        return make

    @staticmethod
    def const(
        value: Any = None,
        *,
        rtol: float = 1e-6,
        atol: float = 0.0,
        pred: Callable[[np.ndarray], bool] | None = None,
        name: str | None = None,
    ) -> ConstPattern:
        return ConstPattern(value, rtol=rtol, atol=atol, pred=pred, name=name)

    @staticmethod
    def weight(
        name: str,
        *,
        dtype: ir.DataType | Sequence[ir.DataType] | None = None,
        shape: Sequence[Any] | None = None,
        pred: Callable[[np.ndarray], bool] | None = None,
    ) -> WeightPattern:
        """A constant of any size, bound by ``name`` as a graph value (see ``WeightPattern``)."""
        return WeightPattern(name, dtype=dtype, shape=shape, pred=pred)

    @staticmethod
    def capture(name: str) -> AttrCapture:
        return AttrCapture(name)

    @staticmethod
    def attr(pred: Callable[[Any], bool], *, name: str | None = None) -> AttrPredicate:
        return AttrPredicate(pred, name)

    @staticmethod
    def any_of(*alternatives: Any, name: str | None = None) -> AnyOf:
        return AnyOf([_as_value_pattern(a) for a in alternatives], name=name)

    @staticmethod
    def optional(value: NodeOutput, *, through: int = 0, name: str | None = None) -> AnyOf:
        """The node's output, or the node skipped (its input ``through`` instead)."""
        if not isinstance(value, NodeOutput):
            raise TypeError("optional() takes the output of a pattern node")
        bypass = value.node.inputs[through]
        if bypass is None:
            raise ValueError(f"optional(): input {through} of {value.node.describe()} is empty")
        return AnyOf((value, bypass), name=name)


@dataclasses.dataclass
class PatternGraph:
    """A built pattern: its variables, returned values and nodes."""

    variables: dict[str, Var]
    outputs: tuple[ValuePattern, ...]
    nodes: tuple[NodePattern, ...]

    def root_ops(self) -> set[tuple[str, str]]:
        """The (domain, op) keys a root node may have: the dispatch index keys."""
        return _producer_ops(self.outputs[0])

    def count_nodes(self) -> int:
        return len(self.nodes)

    def required_ops(self) -> frozenset[tuple[str, str]]:
        """The (domain, op) keys every match contains, whichever alternatives it takes.

        A graph without one of them cannot match, which lets the engine skip
        the rule (and the confirming sweep after a pass fused every instance).
        """
        memo: dict[int, frozenset[tuple[str, str]]] = {}

        def needed(value: ValuePattern | None) -> frozenset[tuple[str, str]]:
            if isinstance(value, NodeOutput):
                node = value.node
                if node.id not in memo:
                    memo[node.id] = frozenset({node.op_key}).union(*(needed(v) for v in node.inputs))
                return memo[node.id]
            if isinstance(value, AnyOf):
                return frozenset.intersection(*(needed(alt) for alt in value.alternatives))
            return frozenset()  # a variable, a constant or an absent input: no node needed

        return frozenset().union(*(needed(v) for v in self.outputs))


def _producer_ops(value: ValuePattern) -> set[tuple[str, str]]:
    if isinstance(value, NodeOutput):
        return {value.node.op_key}
    if isinstance(value, AnyOf):
        ops: set[tuple[str, str]] = set()
        for alt in value.alternatives:
            ops |= _producer_ops(alt)
        return ops
    raise ValueError(
        f"a pattern must return the output of an op (or alternatives of ops), not {value.describe()}"
    )


def _collect_nodes(outputs: Sequence[ValuePattern]) -> tuple[NodePattern, ...]:
    seen: dict[int, NodePattern] = {}
    stack = list(outputs)
    while stack:
        v = stack.pop()
        if isinstance(v, NodeOutput):
            if v.node.id in seen:
                continue
            seen[v.node.id] = v.node
            stack.extend(x for x in v.node.inputs if x is not None)
        elif isinstance(v, AnyOf):
            stack.extend(v.alternatives)
    return tuple(seen.values())


def build_pattern(fn: Callable[..., Any], *, commute: bool = False) -> PatternGraph:
    """Trace a pattern function into a ``PatternGraph``.

    Parameters after the first (``op``) become variables named like the
    parameters. With ``commute=True`` every commutative op in the pattern is
    matched in both input orders.
    """
    import inspect

    params = list(inspect.signature(fn).parameters)
    if not params:
        raise TypeError(f"pattern {fn.__name__} must take the op builder as its first parameter")
    variables = {name: Var(name) for name in params[1:]}
    result = fn(PatternBuilder(), **variables)
    outputs = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    outputs = tuple(_as_value_pattern(o) for o in outputs)
    nodes = _collect_nodes(outputs)
    if commute:
        for node in nodes:
            if node.op_type in COMMUTATIVE_OPS and node.domain == "" and len(node.inputs) == 2:
                node.commute = True
    graph = PatternGraph(variables, outputs, nodes)
    graph.root_ops()  # validates that the first output is produced by an op
    return graph

"""Backtracking matcher: binds a ``PatternGraph`` to nodes and values of a graph.

Matching starts at a candidate root node (the dispatch index only offers
nodes whose op can produce the pattern's first output) and walks the pattern
backwards through producers. Alternatives, commutative inputs and optional
nodes are choice points: the matcher is written as generators that yield each
consistent binding and undo it when resumed, so a later failure (a var bound
twice to different values, a condition) retries the next choice instead of
giving up. Bindings are undone through a trail, not by copying state.

Every failed check is recorded with the number of pattern nodes bound at the
time; the deepest failure is what diagnostics report as "how far the pattern
got and the first check that failed".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.rewrite.pattern import (
    AnyOf,
    AttrCapture,
    AttrPredicate,
    ConstPattern,
    NodeOutput,
    NodePattern,
    SCALAR_COMPARISON_LIMIT,
    PatternGraph,
    ValueConstraint,
    ValuePattern,
    Var,
    WeightPattern,
)

__all__ = ["Binding", "Failure", "PatternMatcher"]


@dataclasses.dataclass
class Failure:
    """Why a match attempt stopped, and how far it had got."""

    reason: str
    nodes_matched: int
    nodes_total: int

    def __str__(self) -> str:
        return f"matched {self.nodes_matched}/{self.nodes_total} pattern nodes; {self.reason}"


@dataclasses.dataclass
class Binding:
    """A complete structural match (a snapshot of the matcher's state)."""

    values: dict[str, ir.Value]
    nodes: dict[int, ir.Node]  # NodePattern.id -> node
    named_nodes: dict[str, ir.Node]
    outputs: list[ir.Value]
    dims: dict[str, Any]
    consts: dict[str, np.ndarray]
    attrs: dict[str, Any]
    alternatives: dict[str, int]


_MISSING = object()


def _attr_default(node: ir.Node, name: str, opset: int | None) -> Any:
    """The schema default of an omitted attribute, or _MISSING."""
    return _schema_default(node.op_type, node.domain or "", name, opset)


@functools.lru_cache(maxsize=4096)
def _schema_default(op_type: str, domain: str, name: str, opset: int | None) -> Any:
    try:
        schema = onnx.defs.get_schema(op_type, opset or onnx.defs.onnx_opset_version(), domain)
    except Exception:  # noqa: BLE001 - no schema (custom op): no default
        return _MISSING
    attr = schema.attributes.get(name)
    if attr is None or not attr.default_value.name:
        return _MISSING
    return _normalize(onnx.helper.get_attribute_value(attr.default_value))


def _normalize(value: Any) -> Any:
    """Attribute values in one comparable form (tuples, ints, str, arrays).

    Plain scalars return before the ``TensorProtocol`` check: isinstance
    against a runtime-checkable Protocol costs tens of microseconds, and
    this runs for every attribute the matcher compares.
    """
    if isinstance(value, ir.Attr):
        value = value.value
    if isinstance(value, ir.DataType):
        return int(value)
    if value is None or isinstance(value, (int, float, str, np.ndarray)):
        return value
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return tuple(_normalize(v) for v in value)
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    return value


def _values_equal(expected: Any, actual: Any) -> bool:
    expected, actual = _normalize(expected), _normalize(actual)
    if isinstance(expected, np.ndarray) or isinstance(actual, np.ndarray):
        a, b = np.asarray(expected), np.asarray(actual)
        return a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=0)
    if isinstance(expected, tuple) and isinstance(actual, tuple):
        return len(expected) == len(actual) and all(map(_values_equal, expected, actual))
    if isinstance(expected, float) or isinstance(actual, float):
        try:
            return bool(np.isclose(float(expected), float(actual), rtol=1e-6, atol=0))
        except (TypeError, ValueError):
            return False
    return expected == actual


def _size_problem(vp: ConstPattern, value: ir.Value, size: int) -> str | None:
    """Why the constant cannot match ``vp`` by its element count alone (nothing read)."""
    if vp.max_elements is not None and size > vp.max_elements:
        return f"constant '{value.name}' has {size} elements (this pattern's limit is {vp.max_elements}); not read"
    if vp.value is None or vp.value.size == size:
        return None
    if vp.value.size != 1:
        return f"constant '{value.name}' has {size} elements, {vp.describe()} has {vp.value.size}"
    if size > SCALAR_COMPARISON_LIMIT:
        return (
            f"constant '{value.name}' has {size} elements; a scalar pattern value is compared only with "
            f"constants of at most {SCALAR_COMPARISON_LIMIT} elements, so it was not read "
            "(give the value with its shape, or use op.const(pred=...) / op.weight(...))"
        )
    return None


class PatternMatcher:
    """Matches one pattern; reusable across candidate roots and graphs."""

    def __init__(self, pattern: PatternGraph, opset: int | None = None) -> None:
        self.pattern = pattern
        self.opset = opset
        self._reset()

    # -- state -------------------------------------------------------------
    def _reset(self) -> None:
        self.values: dict[str, ir.Value] = {}
        self.nodes: dict[int, ir.Node] = {}
        self.node_owner: dict[ir.Node, int] = {}
        self.named_nodes: dict[str, ir.Node] = {}
        self.dims: dict[str, Any] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.attrs: dict[str, Any] = {}
        self.alternatives: dict[str, int] = {}
        self._trail: list[tuple[dict[Any, Any], Any]] = []
        self.failure: Failure | None = None

    def _bind(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        table[key] = value
        self._trail.append((table, key))

    def _undo(self, mark: int) -> None:
        while len(self._trail) > mark:
            table, key = self._trail.pop()
            del table[key]

    def fail(self, reason: str) -> None:
        depth = len(self.nodes)
        if self.failure is None or depth > self.failure.nodes_matched:
            self.failure = Failure(reason, depth, self.pattern.count_nodes())

    def snapshot(self, outputs: list[ir.Value]) -> Binding:
        return Binding(
            values=dict(self.values),
            nodes=dict(self.nodes),
            named_nodes=dict(self.named_nodes),
            outputs=list(outputs),
            dims=dict(self.dims),
            consts=dict(self.consts),
            attrs=dict(self.attrs),
            alternatives=dict(self.alternatives),
        )

    # -- entry point ---------------------------------------------------------
    def bindings(self, root: ir.Node) -> Iterator[Binding]:
        """Yield every structural binding whose first output is produced by ``root``."""
        self._reset()
        first = self.pattern.outputs[0]
        for out in root.outputs:
            for _ in self._match_value(first, out, require_producer=root):
                for outputs in self._match_other_outputs(1, [out]):
                    yield self.snapshot(outputs)

    # -- values --------------------------------------------------------------
    def _match_value(
        self, vp: ValuePattern, value: ir.Value | None, require_producer: ir.Node | None = None
    ) -> Iterator[None]:
        if value is None:
            self.fail(f"{vp.describe()} expected, but the input is empty")
            return
        if isinstance(vp, AnyOf):
            # A named alternative reached again (one optional node on two
            # paths) must take the branch it took the first time.
            chosen = self.alternatives.get(vp.name) if vp.name is not None else None
            for i, alt in enumerate(vp.alternatives):
                if chosen is not None and i != chosen:
                    continue
                mark = len(self._trail)
                if vp.name is not None and chosen is None:
                    self._bind(self.alternatives, vp.name, i)
                for _ in self._match_value(alt, value, require_producer):
                    yield
                self._undo(mark)
            return
        if require_producer is not None and not (
            isinstance(vp, NodeOutput) and value.producer() is require_producer
        ):
            self.fail(f"{vp.describe()} is not produced by the root node")
            return
        mark = len(self._trail)
        if vp.constraint is not None and not self._check_constraint(vp, vp.constraint, value):
            self._undo(mark)
            return
        if isinstance(vp, WeightPattern) and not self._match_weight(vp, value):
            self._undo(mark)
            return
        if isinstance(vp, Var):
            bound = self.values.get(vp.name)
            if bound is None:
                self._bind(self.values, vp.name, value)
                yield
            elif bound is value:
                yield
            else:
                self.fail(
                    f"variable '{vp.name}' is bound to '{bound.name}' but would also be '{value.name}'"
                )
        elif isinstance(vp, ConstPattern):
            if self._match_const(vp, value):
                yield
        elif isinstance(vp, NodeOutput):
            yield from self._match_node_output(vp, value)
        else:  # pragma: no cover - exhaustive
            raise TypeError(vp)
        self._undo(mark)

    def _check_constraint(self, vp: ValuePattern, c: ValueConstraint, value: ir.Value) -> bool:
        if c.dtype is not None:
            allowed = c.dtype if isinstance(c.dtype, tuple) else (c.dtype,)
            if value.dtype not in allowed:
                self.fail(f"{vp.describe()}: dtype {value.dtype} is not {', '.join(map(str, allowed))}")
                return False
        if c.rank is not None or c.shape is not None:
            shape = value.shape
            if shape is None:
                self.fail(f"{vp.describe()}: shape of '{value.name}' is unknown")
                return False
            if c.rank is not None and len(shape) != c.rank:
                self.fail(f"{vp.describe()}: rank {len(shape)} is not {c.rank}")
                return False
            if c.shape is not None and not self._match_shape(vp, c.shape, shape):
                return False
        return True

    def _match_shape(self, vp: ValuePattern, expected: tuple[Any, ...], shape: ir.Shape) -> bool:
        dims = list(shape.dims)
        if expected and expected[0] is Ellipsis:
            expected = expected[1:]
            if len(dims) < len(expected):
                self.fail(f"{vp.describe()}: rank {len(dims)} < {len(expected)}")
                return False
            dims = dims[len(dims) - len(expected):]
        elif len(dims) != len(expected):
            self.fail(f"{vp.describe()}: rank {len(dims)} is not {len(expected)}")
            return False
        for want, got in zip(expected, dims):
            got_key = got if isinstance(got, int) else got.value
            if want is None:
                continue
            if isinstance(want, int):
                if got_key != want:
                    self.fail(f"{vp.describe()}: dim {got_key} is not {want}")
                    return False
            elif isinstance(want, str):
                if got_key is None:
                    self.fail(f"{vp.describe()}: dim '{want}' is unknown in the graph")
                    return False
                bound = self.dims.get(want, _MISSING)
                if bound is _MISSING:
                    self._bind(self.dims, want, got_key)
                elif bound != got_key:
                    self.fail(f"{vp.describe()}: dim '{want}' is {got_key} here but {bound} elsewhere")
                    return False
        return True

    def _match_weight(self, vp: WeightPattern, value: ir.Value) -> bool:
        """dtype and shape from the tensor header; the values only for a predicate."""
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None:
            self.fail(f"'{value.name}' is not a constant ({vp.describe()} expected)")
            return False
        if vp.dtype is not None:
            allowed = vp.dtype if isinstance(vp.dtype, tuple) else (vp.dtype,)
            if tensor.dtype not in allowed:
                self.fail(f"{vp.describe()}: '{value.name}' is {tensor.dtype}, not {', '.join(map(str, allowed))}")
                return False
        if vp.shape is not None and not self._match_shape(vp, vp.shape, ir.Shape(tensor.shape)):
            return False
        if vp.pred is not None and not vp.pred(tensor.numpy()):
            self.fail(f"{vp.describe()}: '{value.name}' (shape {list(tensor.shape)}) fails the predicate")
            return False
        return True

    def _match_const(self, vp: ConstPattern, value: ir.Value) -> bool:
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None:
            self.fail(f"'{value.name}' is not a constant ({vp.describe()} expected)")
            return False
        problem = _size_problem(vp, value, tensor.size)
        if problem is not None:
            self.fail(problem)
            return False
        if vp.value is None and vp.pred is None and vp.name is None:
            return True  # any constant: nothing to read
        arr = tensor.numpy()
        if vp.value is not None:
            try:
                ok = np.allclose(arr.astype(np.float64), vp.value.astype(np.float64), rtol=vp.rtol, atol=vp.atol)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                self.fail(f"constant '{value.name}' is {arr.tolist()!r}, not {vp.value.tolist()!r}")
                return False
        if vp.pred is not None and not vp.pred(arr):
            self.fail(f"constant '{value.name}' = {np.array2string(arr, threshold=8)} fails the predicate of {vp.describe()}")
            return False
        if vp.name is not None:
            bound = self.consts.get(vp.name)
            if bound is not None and not (bound.shape == arr.shape and np.array_equal(bound, arr)):
                self.fail(f"constant '{vp.name}' differs between its uses")
                return False
            if bound is None:
                self._bind(self.consts, vp.name, arr)
        return True

    # -- nodes ---------------------------------------------------------------
    def _match_node_output(self, vp: NodeOutput, value: ir.Value) -> Iterator[None]:
        node = value.producer()
        pn = vp.node
        if node is None:
            what = "a graph input" if value.is_graph_input() else "an initializer" if value.is_initializer() else "not produced by a node"
            self.fail(f"'{value.name}' is {what}; {pn.describe()} expected")
            return
        if value.index() != vp.index:
            self.fail(f"'{value.name}' is output {value.index()} of {node.op_type} '{node.name}', not output {vp.index}")
            return
        bound = self.nodes.get(pn.id)
        if bound is not None:
            if bound is node:
                yield
            else:
                self.fail(f"{pn.describe()} is already matched to '{bound.name}', not '{node.name}'")
            return
        owner = self.node_owner.get(node)
        if owner is not None:
            self.fail(f"node '{node.name}' already matches another pattern node")
            return
        if (node.domain or "") != pn.domain or node.op_type != pn.op_type:
            got = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            self.fail(f"node '{node.name}' is {got}, not {pn.describe()}")
            return
        mark = len(self._trail)
        if not self._match_attributes(pn, node):
            self._undo(mark)
            return
        self._bind(self.nodes, pn.id, node)
        self._bind(self.node_owner, node, pn.id)
        if pn.name is not None:
            self._bind(self.named_nodes, pn.name, node)
        yield from self._match_inputs(pn, node)
        self._undo(mark)

    def _match_attributes(self, pn: NodePattern, node: ir.Node) -> bool:
        for name, expected in pn.attributes.items():
            attr = node.attributes.get(name)
            actual = attr.value if attr is not None else _attr_default(node, name, self.opset)
            if isinstance(expected, AttrCapture):
                if actual is _MISSING:
                    self.fail(f"node '{node.name}': attribute '{name}' is absent and has no default")
                    return False
                if not self._bind_attr(expected.name, _normalize(actual), node, name):
                    return False
            elif isinstance(expected, AttrPredicate):
                value = None if actual is _MISSING else _normalize(actual)
                if not expected.pred(value):
                    self.fail(f"node '{node.name}': attribute {name}={value!r} fails the predicate")
                    return False
                if expected.name is not None and not self._bind_attr(expected.name, value, node, name):
                    return False
            elif actual is _MISSING:
                self.fail(f"node '{node.name}': attribute '{name}' is absent ({expected!r} expected)")
                return False
            elif not _values_equal(expected, actual):
                self.fail(f"node '{node.name}': attribute {name}={_normalize(actual)!r}, not {expected!r}")
                return False
        if not pn.allow_other_attributes:
            extra = sorted(set(node.attributes) - set(pn.attributes))
            if extra:
                self.fail(f"node '{node.name}' has attributes {extra} the pattern does not allow")
                return False
        return True

    def _bind_attr(self, key: str, value: Any, node: ir.Node, attr_name: str) -> bool:
        """Bind a captured attribute; one captured by two nodes must agree."""
        bound = self.attrs.get(key, _MISSING)
        if bound is _MISSING:
            self._bind(self.attrs, key, value)
            return True
        if _values_equal(bound, value):
            return True
        self.fail(f"node '{node.name}': attribute {attr_name}={value!r}, but '{key}' is {bound!r} elsewhere")
        return False

    def _match_inputs(self, pn: NodePattern, node: ir.Node) -> Iterator[None]:
        actual = list(node.inputs)
        # Trailing empty optional inputs are the same as absent ones.
        while actual and actual[-1] is None and len(actual) > len(pn.inputs):
            actual.pop()
        if len(actual) != len(pn.inputs):
            self.fail(f"node '{node.name}' has {len(actual)} inputs, pattern {pn.describe()} has {len(pn.inputs)}")
            return
        orders = [actual]
        if pn.commute and len(actual) == 2:
            orders.append([actual[1], actual[0]])
        for order in orders:
            yield from self._match_input_list(pn.inputs, order, 0)

    def _match_input_list(
        self, patterns: list[ValuePattern | None], values: list[ir.Value | None], i: int
    ) -> Iterator[None]:
        if i == len(patterns):
            yield
            return
        vp = patterns[i]
        if vp is None:
            if values[i] is not None:
                self.fail(f"input {i} should be empty, got '{values[i].name}'")
                return
            yield from self._match_input_list(patterns, values, i + 1)
            return
        for _ in self._match_value(vp, values[i]):
            yield from self._match_input_list(patterns, values, i + 1)

    # -- multi-output patterns -------------------------------------------------
    def _match_other_outputs(self, k: int, found: list[ir.Value]) -> Iterator[list[ir.Value]]:
        outputs = self.pattern.outputs
        if k == len(outputs):
            yield list(found)
            return
        vp = outputs[k]
        for value in self._candidates_for(vp):
            for _ in self._match_value(vp, value):
                yield from self._match_other_outputs(k + 1, [*found, value])

    def _candidates_for(self, vp: ValuePattern) -> list[ir.Value]:
        """Graph values that could be a further pattern output.

        An output whose node is already bound is that node's output. Otherwise
        it is reached forward: a user of a value the match already bound.
        """
        if isinstance(vp, Var):
            bound = self.values.get(vp.name)
            return [bound] if bound is not None else []
        if isinstance(vp, AnyOf):
            out: list[ir.Value] = []
            for alt in vp.alternatives:
                out.extend(v for v in self._candidates_for(alt) if v not in out)
            return out
        if not isinstance(vp, NodeOutput):
            self.fail(f"pattern output {vp.describe()} cannot be located")
            return []
        bound_node = self.nodes.get(vp.node.id)
        if bound_node is not None:
            return [bound_node.outputs[vp.index]] if vp.index < len(bound_node.outputs) else []
        anchors = []
        for inp in vp.node.inputs:
            if isinstance(inp, Var) and inp.name in self.values:
                anchors.append(self.values[inp.name])
            elif isinstance(inp, NodeOutput) and inp.node.id in self.nodes:
                anchors.append(self.nodes[inp.node.id].outputs[inp.index])
        candidates: list[ir.Value] = []
        for anchor in anchors:
            for user in anchor.consumers():
                if user.op_type == vp.node.op_type and (user.domain or "") == vp.node.domain:
                    if vp.index < len(user.outputs) and user.outputs[vp.index] not in candidates:
                        candidates.append(user.outputs[vp.index])
        if not candidates:
            self.fail(f"no {vp.node.describe()} consumes the values matched so far (second pattern output)")
        return candidates

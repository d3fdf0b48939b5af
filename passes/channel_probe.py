"""Run the data-movement subgraph between two values on a probe, to learn which element each output reads.

Exporters spell "take these channels, in this order, some negated" in many
ways: slices with a step, ``stack`` + ``flatten`` (Unsqueeze, Concat,
Reshape), Split, Gather with constant indices, Tile / Expand +
Reshape for ``repeat_interleave``. Rather than matching each spelling, a
rule can ask what the subgraph *does*: :func:`probe` collects the nodes
between a source value and a target, checks that the data path goes only
through ops that move elements (and ``Neg``, where allowed) -- so every
output element is one input element, maybe negated -- and runs that
subgraph in onnx's reference evaluator on a source filled with 1, 2, 3, ...
The output then names, element by element, the source element it holds
and its sign. The integer side inputs of those ops (slice bounds, reshape
targets) may be computed from shapes (``Shape`` of the source, of a value on
the path, or of a graph value whose dims share the source's dim names);
anything else they read makes the probe refuse, with the value it met.

The probe draws every symbolic dim as a small distinct prime (one per dim
name), so a dim of the result tells which source dim it came from; a caller
may draw another set (``primes``) to see that what it read does not depend
on the sizes drawn. The source holds each element's number exactly: a probe
larger than its dtype counts exactly (2048 for float16) is refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from qgraph_passes.shape_values import static_dim, static_value

__all__ = ["ChannelMap", "Probe", "channel_map", "movement_source", "probe", "reaches"]

# Ops that only move, copy or drop elements of their data input(s).
MOVEMENT = frozenset({"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Identity",
                      "Split", "Gather", "Tile", "Expand"})
# What the integer side inputs (bounds, shapes, repeats) may be computed with.
_SHAPE_OPS = MOVEMENT | {"Shape", "Size", "Cast", "Add", "Sub", "Mul", "Div", "Range", "ConstantOfShape", "Constant",
                         "Equal", "Where", "Max", "Min", "Abs"}
# Ops that compute each element from the same element alone (the binary ones with a one-number
# operand): they commute with moving elements, so a probe of where elements go may skip them.
_ELEMENTWISE_UNARY = frozenset({"Cast", "Cos", "Sin", "Neg", "Identity"})
_SCALAR_BINARY = frozenset({"Mul", "Div", "Add", "Sub"})
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)
_MAX_NODES = 64
_MAX_ELEMENTS = 1 << 16
# The largest count each float dtype holds exactly (2 ** (mantissa bits + 1)).
_EXACT_COUNT = {ir.DataType.FLOAT16: 1 << 11, ir.DataType.BFLOAT16: 1 << 8, ir.DataType.FLOAT: 1 << 24}


@dataclasses.dataclass
class Probe:
    """The source drawn, and what the target is at it."""

    source: np.ndarray  #: the source: 1, 2, 3, ... in its probe shape
    target: np.ndarray  #: the target computed from it
    dims: dict[str, int]  #: the size drawn for each symbolic dim name


def _is_constant(value: ir.Value) -> bool:
    return ir.convenience.get_const_tensor(value) is not None and value.producer() is None


def _default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _elementwise_input(node: ir.Node) -> ir.Value | None:
    """The one tensor an element-wise node reads (the other operand being one number), if it is one."""
    if not _default_domain(node):
        return None
    if node.op_type in _ELEMENTWISE_UNARY:
        return node.inputs[0]
    if node.op_type in _SCALAR_BINARY and len(node.inputs) == 2:
        for tensor, other in (node.inputs, node.inputs[::-1]):
            constant = ir.convenience.get_const_tensor(other) if other is not None else None
            if constant is not None and constant.size == 1:
                return tensor
    return None


def reaches(target: ir.Value, source: ir.Value, allow_neg: bool = True, elementwise: bool = False,
            depth: int = 16) -> bool:
    """Whether ``target`` is computed from ``source`` through element-moving ops (and Neg) alone.

    ``elementwise`` lets the walk cross element-wise ops too (a diagnostic looking for what
    was nearly a rotation, such as ``x * -1`` written for ``-x``).
    """
    frontier, seen = [target], set()
    for _ in range(depth):
        nxt = []
        for value in frontier:
            if value is source:
                return True
            node = value.producer()
            if node is None or node in seen or not _default_domain(node):
                continue
            seen.add(node)
            if elementwise and _elementwise_input(node) is not None:
                nxt.append(_elementwise_input(node))
            elif node.op_type in MOVEMENT or (allow_neg and node.op_type == "Neg"):
                data = node.inputs if node.op_type == "Concat" else node.inputs[:1]
                nxt.extend(v for v in data if v is not None and v.dtype == source.dtype)
        frontier = nxt
    return False


def movement_source(value: ir.Value) -> ir.Value:
    """Where the chain of element-moving (and element-wise) ops above ``value`` starts.

    The walk follows the data input of Slice, Unsqueeze, Reshape, Tile,
    Expand, Split, Transpose, ..., of a Gather with constant indices and of
    element-wise ops (cos, casts, scaling by a number); a Gather that reads
    computed indices (a table row per position) starts the chain, as does
    any other op; so does a Concat of values that do not all start from one
    value.
    """
    current = value
    for _ in range(_MAX_NODES):
        node = current.producer()
        if node is not None and _elementwise_input(node) is not None:
            current = _elementwise_input(node)
            continue
        if node is None or not _default_domain(node) or node.op_type not in MOVEMENT:
            return current
        if node.op_type == "Concat":  # copies of one value side by side (torch.cat((t, t))) continue the chain
            starts = {movement_source(v) for v in node.inputs if v is not None}
            return starts.pop() if len(starts) == 1 and node.inputs[0] is not None else current
        if node.op_type == "Gather" and ir.convenience.get_const_tensor(node.inputs[1]) is None:
            return current
        current = node.inputs[0]
    return current


class _Collector:
    def __init__(self, source: ir.Value, allow_neg: bool, skip_elementwise: bool) -> None:
        self.source = source
        self.allow_neg = allow_neg
        self.skip_elementwise = skip_elementwise
        self.pass_through: set[ir.Node] = set()  # element-wise nodes run as Identity on the probe
        self.nodes: dict[ir.Node, None] = {}  # insertion order = a reverse topological order
        self.constants: dict[str, ir.Value] = {}
        self.shape_inputs: dict[str, ir.Value] = {}

    def data(self, value: ir.Value) -> str | None:
        """Collect the data path above ``value`` down to the source; why not, if it leaves the allowed ops."""
        if value is self.source:
            return None
        node = value.producer()
        if node is None or not _default_domain(node):
            return f"'{value.name}' is not computed from '{self.source.name}' (it is a graph input or weight)"
        if node in self.nodes:
            return None
        if self.skip_elementwise and _elementwise_input(node) is not None:
            self.nodes[node] = None
            self.pass_through.add(node)
            return self.data(_elementwise_input(node))
        if not (node.op_type in MOVEMENT or (self.allow_neg and node.op_type == "Neg")):
            return f"'{value.name}' comes from {node.op_type} '{node.name}', which does more than move elements"
        if len(self.nodes) >= _MAX_NODES:
            return f"more than {_MAX_NODES} nodes between '{self.source.name}' and the value probed"
        self.nodes[node] = None
        data = node.inputs if node.op_type == "Concat" else node.inputs[:1]
        for v in data:
            reason = self.data(v) if v is not None else None
            if reason is not None:
                return reason
        for v in (node.inputs[1:] if node.op_type != "Concat" else ()):
            reason = self.side(v) if v is not None else None
            if reason is not None:
                return f"{node.op_type} '{node.name}' reads {reason}"
        return None

    def side(self, value: ir.Value) -> str | None:
        """Collect what an integer side input is computed with (constants and shapes only)."""
        if value is self.source or value.producer() in self.nodes:
            return None
        if _is_constant(value):
            self.constants[value.name] = value
            return None
        node = value.producer()
        if node is None:
            return f"'{value.name}', a graph input"
        if not _default_domain(node) or node.op_type not in _SHAPE_OPS:
            if static_value(value) is not None:  # computed from static dims: a constant here
                self.constants[value.name] = value
                return None
            return f"'{value.name}' (from {node.op_type}), not a constant or a shape"
        if len(self.nodes) >= _MAX_NODES:
            return f"more than {_MAX_NODES} nodes in the shape arithmetic"
        self.nodes[node] = None
        if node.op_type == "Shape":
            shaped = node.inputs[0]
            if shaped is not self.source and shaped.producer() not in self.nodes:
                self.shape_inputs[shaped.name] = shaped  # fed as zeros of its (drawn) shape
            return None
        for v in node.inputs:
            reason = self.side(v) if v is not None else None
            if reason is not None:
                return reason
        return None


def _draw_shape(value: ir.Value, dims: dict[str, int], primes: tuple[int, ...] = _PRIMES) -> list[int] | str:
    if value.shape is None:
        return f"the rank of '{value.name}' is not known"
    shape = []
    for axis, dim in enumerate(value.shape.dims):
        known = static_dim(value, axis)
        if known is not None:
            shape.append(known)
            continue
        name = getattr(dim, "value", None) or f"{value.name}#{axis}"  # an unnamed dim: its own size
        if name not in dims:
            if len(dims) >= len(primes):
                return f"'{value.name}' has more symbolic dims than the probe draws"
            dims[name] = primes[len(dims)]
        shape.append(dims[name])
    return shape


def probe(source: ir.Value, target: ir.Value, allow_neg: bool = True, skip_elementwise: bool = False,
          primes: tuple[int, ...] = _PRIMES, max_elements: int = _MAX_ELEMENTS) -> Probe | str:
    """Run the element-moving subgraph from ``source`` to ``target``; why it cannot be run, if it cannot.

    ``skip_elementwise`` runs element-wise ops on the path (cos, casts,
    scaling by a number) as Identity: the probe then shows where each
    element went, which those ops do not change. ``primes`` are the sizes
    drawn for the symbolic dims, in the order met; ``max_elements`` bounds
    the source drawn.
    """
    if source.dtype is None or not source.name or not target.name:
        return f"'{source.name}' or '{target.name}' has no dtype or name to build a probe with"
    collector = _Collector(source, allow_neg, skip_elementwise)
    reason = collector.data(target)
    if reason is not None:
        return reason
    if any(not v.name for node in collector.nodes for v in (*node.inputs, *node.outputs) if v is not None):
        return f"a value between '{source.name}' and '{target.name}' has no name to build a probe with"
    dims: dict[str, int] = {}
    source_shape = _draw_shape(source, dims, primes)
    if isinstance(source_shape, str):
        return source_shape
    size = int(np.prod(source_shape))
    if size > max_elements:
        return f"the probe of '{source.name}' would hold {size} elements"
    exact = _EXACT_COUNT.get(source.dtype)
    if exact is not None and size > exact:
        return f"the probe of '{source.name}' would hold {size} elements, more than {source.dtype} counts exactly"
    feeds = {source.name: np.arange(1, size + 1, dtype=np.float32).reshape(source_shape).astype(source.dtype.numpy())}
    inputs = [onnx.helper.make_tensor_value_info(source.name, source.dtype, source_shape)]
    for name, value in collector.shape_inputs.items():
        shape = _draw_shape(value, dims, primes)
        if isinstance(shape, str) or value.dtype is None:
            return shape if isinstance(shape, str) else f"the dtype of '{name}' is not known"
        feeds[name] = np.zeros(shape, value.dtype.numpy())
        inputs.append(onnx.helper.make_tensor_value_info(name, value.dtype, shape))
    initializers = []
    for name, value in collector.constants.items():
        array = ir.convenience.get_const_tensor(value)
        array = array.numpy() if array is not None else static_value(value)
        initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    nodes = [_identity(node, collector) if node in collector.pass_through else ir.serde.serialize_node(node)
             for node in reversed(collector.nodes)]
    graph = onnx.helper.make_graph(nodes, "probe", inputs, [onnx.helper.make_value_info(target.name, onnx.TypeProto())],
                                   initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)], ir_version=10)
    try:
        (result,) = ReferenceEvaluator(_topologically_sorted(model)).run(None, feeds)
    except Exception as exc:  # the subgraph does not run on the drawn shapes: say so, do not guess
        return f"the subgraph from '{source.name}' to '{target.name}' does not run on a probe: {type(exc).__name__}: {exc}"
    return Probe(feeds[source.name], np.asarray(result), dims)


def _identity(node: ir.Node, collector: _Collector) -> onnx.NodeProto:
    return onnx.helper.make_node("Identity", [_elementwise_input(node).name], [node.outputs[0].name], name=node.name)


def _topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("the probe's subgraph reads a value it does not compute")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
            pending.remove(n)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """target[..., j] == sign[j] * source[..., perm[j]] at every leading index."""

    perm: tuple[int, ...]
    sign: tuple[int, ...]


def channel_map(source: ir.Value, target: ir.Value) -> ChannelMap | str:
    """Which channel (last axis) of ``source`` each channel of ``target`` holds, with its sign, proven on a probe.

    Only a target of the source's shape whose every element is one element
    of the same leading index, the same channel mapping at every index,
    gives a map; anything else is answered with what the probe showed.
    """
    run = probe(source, target, allow_neg=True)
    if isinstance(run, str):
        return run
    out = run.target
    if out.shape != run.source.shape:
        return f"'{target.name}' has shape {list(out.shape)} at the probe where '{source.name}' has {list(run.source.shape)}"
    held = np.abs(out).astype(np.int64) - 1  # the flat index of the source element each output element holds
    lead = np.arange(out.size).reshape(out.shape) // out.shape[-1]
    if (held < 0).any() or not np.array_equal(held // out.shape[-1], lead):
        return f"'{target.name}' mixes elements across the leading axes of '{source.name}', not only channels"
    perm, sign = held % out.shape[-1], np.sign(out).astype(np.int64)
    if not (np.all(perm == perm.reshape(-1, out.shape[-1])[0]) and np.all(sign == sign.reshape(-1, out.shape[-1])[0])):
        return f"'{target.name}' moves the channels of '{source.name}' differently at different positions"
    first = perm.reshape(-1, out.shape[-1])[0], sign.reshape(-1, out.shape[-1])[0]
    return ChannelMap(tuple(int(v) for v in first[0]), tuple(int(v) for v in first[1]))

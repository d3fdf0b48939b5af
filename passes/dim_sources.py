"""Where each dim of a value comes from: a number, or one dim of a graph input, proven op by op.

Exporters write the same layer with different shape bookkeeping. The dynamo
exporter names every dim after the input it came from (``batch_size``,
``sequence_length``); TorchScript's graphs, once onnx shape inference has run,
call the batch dim of a head split ``unk__15`` and that of the next one
``unk__19``, and compute the split's target shape at run time from a
``Shape`` of some other tensor. Rules that must know that two dims are one
(the heads split keeps the batch and sequence dims, a rotary table has the
query's length) then fail on one exporter and not the other.

:func:`DimSources.source` answers the question from what the ops compute,
not from names: a dim is followed back through ops that copy it (Transpose
moves it, Split/Slice/Concat keep the other axes, elementwise ops keep it
when every operand that is not 1 there has the same source, MatMul by a 2-D
weight keeps the leading dims, an embedding Gather keeps the ids' dims,
Attention's 4-D output has q's batch, heads and length and v's head size,
``Range(0, d, 1)`` is d long, CumSum keeps its input's dims, a Split's
parts along its axis are its constant ``split`` or equal parts of a number,
a Slice by numbers with a positive step has the length Python's slice
gives, Reshape copies a dim that its shape tensor reads as ``Shape(y)[j]``,
or as 0, and infers for its -1 the one dim of x the other entries leave)
until it reaches a graph input's dim or a number. The entries of a shape
tensor are followed through the integer arithmetic exporters write on them
(TorchScript's repeat_kv target holds ``kv_heads * n_rep`` as a ``Mul`` of
two numbers; GPT-2's Conv1D reads ``Shape(x)[-1:]``, a Slice): numbers
combine into a number, ``d * 1`` and ``d + 0`` stay
the dim d; any other product or sum of a dim is not a dim of an input, and
is unknown. Two dims with the same
source are equal for every input the graph accepts. Anything not listed
gives None: unknown, never guessed.

Graph inputs' dims that carry the same ``dim_param`` are one source (the
first input, in the graph's order, that carries it). That is the caller's
contract, not a guess: the ONNX IR spec (docs/IR.md, *Static tensor
shapes*) makes a dimension variable one value across the whole graph, so
inputs declared ``[batch, seq]`` must be fed tensors of equal dims there.
Only graph inputs are unified, whose names the caller declares; the names
an exporter or shape inference gives intermediate values (``unk__15``,
``s0``) prove nothing, and are never read.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

__all__ = ["Const", "DimSources", "InputDim", "Source"]

_MAX_DEPTH = 48


class InputDim(tuple):
    """Dim ``axis`` of graph input ``value``: ``(value, axis)``."""

    __slots__ = ()

    def __new__(cls, value: ir.Value, axis: int):
        return super().__new__(cls, (value, axis))

    @property
    def value(self) -> ir.Value:
        return self[0]

    @property
    def axis(self) -> int:
        return self[1]


class Const(int):
    """A dim that is this number for every input."""


Source = InputDim | Const

# The output has the first input's shape (the second input of these is an attribute-like operand, a
# weight or a scale, that never widens it).
_SAME_AS_FIRST = frozenset({
    "Identity", "Cast", "CastLike", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Exp", "Log",
    "Reciprocal", "Softmax", "LogSoftmax", "Gelu", "FastGelu", "Not", "Sin", "Cos", "IsNaN", "Clip",
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    "CustomRMSNorm", "RotaryEmbedding", "Dropout", "CumSum",
})
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Equal", "Less", "Greater",
                        "LessOrEqual", "GreaterOrEqual", "Max", "Min"})


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size > 64:
        return None
    return np.asarray(tensor.numpy())


class DimSources:
    """Memoized :meth:`source` and :meth:`entries` over one graph (build a new one after rewriting it)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._inputs = set(graph.inputs)
        # dim_param -> the first graph input's dim that carries it: equal names on inputs are one value (IR spec)
        self._declared: dict[str, InputDim] = {}
        for value in graph.inputs:
            for axis, dim in enumerate(value.shape.dims if value.shape is not None else ()):
                if isinstance(dim, ir.SymbolicDim) and dim.value:
                    self._declared.setdefault(dim.value, InputDim(value, axis))
        self._sources: dict[tuple[ir.Value, int], Source | None] = {}
        self._entries: dict[ir.Value, list[Source | None] | None] = {}

    # -- the dims of a value ---------------------------------------------------------------

    def source(self, value: ir.Value | None, axis: int, depth: int = 0) -> Source | None:
        """Where dim ``axis`` of ``value`` comes from, or None if not proven."""
        rank = _rank(value)
        if rank is None or not -rank <= axis < rank or depth > _MAX_DEPTH:
            return None
        axis %= rank
        key = (value, axis)
        if key not in self._sources:
            self._sources[key] = self._find(value, axis, depth)
        return self._sources[key]

    def _find(self, value: ir.Value, axis: int, depth: int) -> Source | None:
        dim = value.shape.dims[axis]
        fixed = value in self._inputs or ir.convenience.get_const_tensor(value) is not None
        # A declared 1 on an intermediate is believed only where the op that made it says so: a pass that
        # widens a batch-1 value (kv-cache feeding per-row positions to a rotary table) may leave it stale.
        if isinstance(dim, int) and (dim != 1 or fixed):
            return Const(dim)
        if value in self._inputs:
            named = self._declared.get(dim.value) if isinstance(dim, ir.SymbolicDim) and dim.value else None
            return named or InputDim(value, axis)
        return self._from_producer(value, axis, depth)

    def _from_producer(self, value: ir.Value, axis: int, depth: int) -> Source | None:
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx", "com.microsoft") or not node.inputs:
            return None
        op, first, d = node.op_type, node.inputs[0], depth + 1
        rank = len(value.shape)
        if op == "Transpose":
            perm = _attr(node, "perm")
            return self.source(first, perm[axis], d) if perm is not None else None
        if op in _SAME_AS_FIRST and _rank(first) == rank and value is node.outputs[0]:
            return self.source(first, axis, d)
        if op == "Split" and _rank(first) == rank and _attr(node, "axis", 0) % rank == axis:
            return self._split_part(node, value, axis, d)
        if op in ("Split", "Concat"):
            along = _attr(node, "axis", 0) % rank
            return self.source(first, axis, d) if along != axis and _rank(first) == rank else None
        if op == "Slice":
            return self._sliced(node, axis, rank, d)
        if op == "Attention" and value is node.outputs[0] and _rank(first) == rank and axis in ((0, 1), (0, 1, 2))[rank == 4]:
            return self.source(first, axis, d)  # [B, S, Hq*Dv] or [B, Hq, S, Dv]: batch, heads and length are q's
        if op == "Attention" and value is node.outputs[0] and rank == 4 and axis == 3 and _rank(node.inputs[2]) == 4:
            return self.source(node.inputs[2], 3, d)  # Dv, v's head size
        if op in _BROADCAST:
            return self._broadcast(node.inputs, axis, rank, d)
        if op == "MatMul" and _rank(node.inputs[1]) == 2 and _rank(first) == rank and axis < rank - 1:
            return self.source(first, axis, d)
        if op == "Gather" and _attr(node, "axis", 0) == 0 and _rank(first) is not None:
            ids = node.inputs[1]
            ids_rank = _rank(ids)
            if ids_rank is not None and rank == ids_rank + _rank(first) - 1:
                return self.source(ids, axis, d) if axis < ids_rank else self.source(first, axis - ids_rank + 1, d)
            return None
        if op == "Reshape" and len(node.inputs) > 1:
            return self._reshaped(node, axis, d)
        if op == "Expand" and len(node.inputs) > 1:
            entries = self.entries(node.inputs[1], d)
            if entries is None or len(entries) != rank:
                return None
            return self._combine([self._aligned(first, axis, rank, d), entries[axis]])
        if op == "Range" and len(node.inputs) == 3 and value.dtype in _INT_RANGE:
            return self._range_length(node.inputs, d)
        if op == "Unsqueeze":
            axes = _const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None:
                return None
            inserted = sorted(int(a) % rank for a in axes.reshape(-1))
            if axis in inserted:
                return Const(1)
            return self.source(first, axis - sum(1 for a in inserted if a < axis), d)
        return None

    def _range_length(self, bounds, depth: int) -> Source | None:
        """The length of ``Range(start, limit, delta)``: a number, or the limit's dim when it counts 0, 1, 2..."""
        start, limit, delta = (self.entries(x, depth) for x in bounds)
        if any(e is None or len(e) != 1 or e[0] is None for e in (start, limit, delta)):
            return None
        (start,), (limit,), (delta,) = start, limit, delta
        if all(isinstance(e, Const) for e in (start, limit, delta)) and delta != 0:
            return Const(max(-((int(start) - int(limit)) // int(delta)), 0))  # ceil((limit - start) / delta)
        return limit if start == Const(0) and delta == Const(1) and isinstance(limit, InputDim) else None

    def _aligned(self, operand: ir.Value | None, axis: int, rank: int, depth: int) -> Source | None:
        """The operand's dim under output axis ``axis`` in numpy broadcasting (Const(1) where it has none)."""
        r = _rank(operand)
        if r is None:
            return None
        at = axis - (rank - r)
        return Const(1) if at < 0 else self.source(operand, at, depth)

    @staticmethod
    def _combine(sources: list[Source | None]) -> Source | None:
        """The broadcast of several dims: the one that is not 1, when all such agree."""
        if any(s is None for s in sources):
            return None
        wide = {s for s in sources if not (isinstance(s, Const) and s == 1)}
        if not wide:
            return Const(1)
        return wide.pop() if len(wide) == 1 else None

    def _broadcast(self, operands, axis: int, rank: int, depth: int) -> Source | None:
        return self._combine([self._aligned(x, axis, rank, depth) for x in operands if x is not None])

    def _sliced(self, node: ir.Node, axis: int, rank: int, depth: int) -> Source | None:
        if _rank(node.inputs[0]) != rank or len(node.inputs) < 3:
            return None
        axes = _const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None:
            starts = self.entries(node.inputs[1], depth)
            if starts is None:
                return None
            axes = np.arange(len(starts))
        sliced = [int(a) % rank for a in axes.reshape(-1)]
        whole = self.source(node.inputs[0], axis, depth)
        return self._slice_length(node, sliced.index(axis), whole, depth) if axis in sliced else whole

    def _slice_length(self, node: ir.Node, at: int, whole: Source | None, depth: int) -> Source | None:
        """The length of a Slice along its ``at``-th axis, where the bounds are numbers and the step positive.

        A dim that is a number gives a number (ONNX clamps a positive step's
        bounds as Python's slices do); any dim stays itself under ``[0:end:1]``
        with end the largest int64, TorchScript's ``x[..., :]`` and the
        ``x[..., d:]`` / ``x[..., :d]`` of a rotary over the whole head.
        """
        bounds = []
        for i in (1, 2, 4):
            entries = self.entries(node.inputs[i], depth) if i < len(node.inputs) and node.inputs[i] is not None \
                else ([Const(1)] * (at + 1) if i == 4 else None)
            entry = entries[at] if entries is not None and at < len(entries) else None
            if not isinstance(entry, Const):
                return None
            bounds.append(int(entry))
        start, end, step = bounds
        if step <= 0 or whole is None:
            return None
        if isinstance(whole, Const):
            return Const(len(range(int(whole))[start:end:step]))
        return whole if (start, step) == (0, 1) and end >= _INT_RANGE[ir.DataType.INT64][1] else None

    def _split_part(self, node: ir.Node, value: ir.Value, axis: int, depth: int) -> Source | None:
        """The length of one part along the split axis: the constant ``split`` entry, else the equal parts'."""
        index = next(i for i, out in enumerate(node.outputs) if out is value)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            split = _const_array(node.inputs[1])
            if split is None or split.size != len(node.outputs):
                return None
            return Const(int(split.reshape(-1)[index]))
        whole = self.source(node.inputs[0], axis, depth)
        if not isinstance(whole, Const):
            return None
        # equal parts of ceil(n / parts), the last one what is left (opset 18's num_outputs; before it, even only)
        chunk = -(-int(whole) // len(node.outputs))
        return Const(max(0, min(chunk, int(whole) - index * chunk)))

    def _reshaped(self, node: ir.Node, axis: int, depth: int) -> Source | None:
        target = self.reshape_target(node, depth)
        if target is not None and axis < len(target):
            if target[axis] > 0:
                return Const(target[axis])
            if target[axis] == 0:
                return self.source(node.inputs[0], axis, depth)
        entries = self.entries(node.inputs[1], depth)
        if entries is None or axis >= len(entries):
            return None
        entry = entries[axis]
        if isinstance(entry, Const):
            if entry > 0:
                return entry
            if entry == 0 and not _attr(node, "allowzero", 0):
                return self.source(node.inputs[0], axis, depth)
            if entry == -1:
                return self._inferred(node, entries, axis, depth)
            return None  # a zero-sized dim on purpose
        return entry

    def _inferred(self, node: ir.Node, entries: list[Source | None], axis: int, depth: int) -> Source | None:
        """The dim a Reshape infers for its -1 entry (at ``axis``): x's one dim that the other entries leave.

        The -1 is ``size(x) / prod(other entries)``. Where the other entries
        are x's dims but one, s (dims with one source cancel, whatever their
        axis), and the numbers on both sides have one product, that quotient is
        s for every input: where a cancelled dim is 0 onnxruntime refuses to
        infer a -1 at all. TorchScript writes ``view(-1, S)`` of ``[B, S]`` ids
        and ``view(B, S, -1, D)`` for the head split.
        """
        x = node.inputs[0]
        rank_x = _rank(x)
        if rank_x is None:
            return None
        others: list[Source | None] = []
        for at, entry in enumerate(entries):
            if at == axis:
                continue
            if entry == Const(0) and not _attr(node, "allowzero", 0):
                entry = self.source(x, at, depth) if at < rank_x else None
            if entry is None or entry == Const(-1) or (isinstance(entry, Const) and entry <= 0):
                return None
            others.append(entry)
        left = [self.source(x, at, depth) for at in range(rank_x)]
        if any(s is None for s in left):
            return None
        for entry in others:
            if not isinstance(entry, Const):
                if entry not in left:
                    return None
                left.remove(entry)
        dims = [s for s in left if not isinstance(s, Const)]
        numbers = math.prod(int(s) for s in left if isinstance(s, Const))
        known = math.prod(int(e) for e in others if isinstance(e, Const))
        if len(dims) == 1 and numbers == known:
            return dims[0]
        if not dims and known and numbers % known == 0:
            return Const(numbers // known)
        return None

    def reshape_target(self, node: ir.Node, depth: int = 0) -> list[int] | None:
        """A constant target equal to the Reshape's own for every input (0: x's dim there, allowzero 0), if proven.

        Every entry must be a number or x's own dim at that axis; a -1 is
        resolved when the dims of x that are not copied are numbers.
        """
        x = node.inputs[0]
        if x is None or x.shape is None or len(node.inputs) < 2:
            return None
        entries = self.entries(node.inputs[1], depth + 1)
        if entries is None or any(e is None for e in entries):
            return None
        allowzero = _attr(node, "allowzero", 0)
        rank_x = len(x.shape)
        out: list[int] = []
        for axis, entry in enumerate(entries):
            if isinstance(entry, Const):
                if entry == 0 and allowzero:
                    return None  # a zero-sized dim on purpose
                out.append(int(entry))
            elif axis < rank_x and self.source(x, axis, depth + 1) == entry:
                out.append(0)  # the entry reads x's own dim here
            else:
                return None
        if out.count(-1) > 1 or any(v == 0 and axis >= rank_x for axis, v in enumerate(out)):
            return None
        if -1 in out:
            copied = {axis for axis, v in enumerate(out) if v == 0}
            rest = [self.source(x, axis, depth + 1) for axis in range(rank_x) if axis not in copied]
            known = math.prod(v for v in out if v > 0)
            if all(isinstance(r, Const) for r in rest) and known and math.prod(rest) % known == 0:
                out[out.index(-1)] = math.prod(rest) // known
        return out

    # -- the entries of a 1-D shape tensor --------------------------------------------------

    def entries(self, value: ir.Value | None, depth: int = 0) -> list[Source | None] | None:
        """The entries of a 1-D int64 tensor (a Reshape/Expand target) as sources, each None if unknown."""
        if value is None or depth > _MAX_DEPTH:
            return None
        if value not in self._entries:
            self._entries[value] = self._find_entries(value, depth + 1)
        return self._entries[value]

    def _find_entries(self, value: ir.Value, depth: int) -> list[Source | None] | None:
        array = _const_array(value)
        if array is not None:
            return [Const(int(x)) for x in array.reshape(-1)] if array.ndim <= 1 else None
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op == "Shape":
            x = node.inputs[0]
            rank = _rank(x)
            if rank is None:
                return None
            axes = range(rank)[slice(_attr(node, "start", 0), _attr(node, "end", rank))]
            return [self.source(x, a, depth) for a in axes]
        if op == "Concat":
            out: list[Source | None] = []
            for piece in node.inputs:
                got = self.entries(piece, depth)
                if got is None:
                    return None
                out.extend(got)
            return out
        if op == "Slice" and len(node.inputs) >= 3:
            return self._sliced_entries(node, depth)
        if op == "Gather" and _attr(node, "axis", 0) == 0 and len(node.inputs) == 2:
            whole, index = self.entries(node.inputs[0], depth), _const_array(node.inputs[1])
            if whole is None or index is None or index.ndim > 1:
                return None
            if not all(-len(whole) <= int(i) < len(whole) for i in index.reshape(-1)):
                return None
            return [whole[int(i)] for i in index.reshape(-1)]
        if op == "Cast" and _attr(node, "to") not in (ir.DataType.INT64, ir.DataType.INT32):
            return None
        if op in _ARITHMETIC and len(node.inputs) == 2 and value.dtype in _INT_RANGE:
            return self._arithmetic(op, node.inputs, _INT_RANGE[value.dtype], depth)
        if op in ("Unsqueeze", "Squeeze", "Identity", "Reshape", "Cast"):
            # a scalar made 1-D and back: the same one entry (a Cast between int types keeps a dim)
            inner = self.entries(node.inputs[0], depth) if _rank(node.inputs[0]) in (0, 1) else None
            return inner if inner is not None and len(inner) == 1 else None
        return None

    def _sliced_entries(self, node: ir.Node, depth: int) -> list[Source | None] | None:
        """``Slice`` of a 1-D shape tensor by constant bounds with a positive step (``Shape(x)[-1:]``).

        For a positive step ONNX clamps start and end as Python's slices do
        (negative ones counted from the end, then into ``[0, n]``).
        """
        whole = self.entries(node.inputs[0], depth)
        bounds = [_const_array(x) if x is not None else None for x in node.inputs[1:5]]
        starts, ends = bounds[0], bounds[1]
        axes = bounds[2] if len(bounds) > 2 and node.inputs[3] is not None else np.zeros(1, np.int64)
        steps = bounds[3] if len(bounds) > 3 and node.inputs[4] is not None else np.ones(1, np.int64)
        if whole is None or any(b is None or b.size != 1 for b in (starts, ends, axes, steps)):
            return None
        if int(axes.reshape(-1)[0]) not in (0, -1) or int(steps.reshape(-1)[0]) <= 0:
            return None
        return whole[slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), int(steps.reshape(-1)[0]))]

    def _arithmetic(self, op: str, operands, bounds: tuple[int, int], depth: int) -> list[Source | None] | None:
        """Entries of ``Mul``/``Add``/``Sub``/``Div`` of two 0-D or 1-D int tensors, entry by entry (broadcast)."""
        if any(_rank(x) not in (0, 1) for x in operands):
            return None
        a, b = (self.entries(x, depth) for x in operands)
        if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
            return None
        if len(a) == 1:
            a = a * len(b)
        elif len(b) == 1:
            b = b * len(a)
        return [_combine_entry(op, x, y, bounds) for x, y in zip(a, b, strict=True)]

    def breaking_op(self, value: ir.Value | None, depth: int = 0) -> ir.Node | None:
        """The node where following the entries of ``value`` stops (entries() is None), if one is found."""
        node = value.producer() if value is not None else None
        if node is None or depth > _MAX_DEPTH or self.entries(value) is not None:
            return None
        unknown = [x for x in node.inputs if x is not None and self.entries(x) is None]
        if node.op_type in ("Concat", "Unsqueeze", "Squeeze", "Identity", "Reshape", "Cast", "Gather", "Slice",
                            *_ARITHMETIC) and unknown:
            return self.breaking_op(unknown[0], depth + 1) or node
        return node


# Integer arithmetic on shape entries: the output's dtype bounds the numbers (an overflow is not folded).
_ARITHMETIC = ("Mul", "Add", "Sub", "Div")
_INT_RANGE = {ir.DataType.INT64: (-(2**63), 2**63 - 1), ir.DataType.INT32: (-(2**31), 2**31 - 1)}


def _combine_entry(op: str, x: Source | None, y: Source | None, bounds: tuple[int, int]) -> Source | None:
    """One entry of ``x op y``: numbers fold, a dim times 1 (plus or minus 0, over 1) is that dim, else unknown."""
    if x is None or y is None:
        return None
    if isinstance(x, Const) and isinstance(y, Const):
        if op == "Div":  # integer Div truncates; folded only where truncation and floor agree
            folded = int(x) // int(y) if int(x) >= 0 and int(y) > 0 else None
        else:
            folded = {"Mul": int(x) * int(y), "Add": int(x) + int(y), "Sub": int(x) - int(y)}[op]
        return Const(folded) if folded is not None and bounds[0] <= folded <= bounds[1] else None
    identity = {"Mul": 1, "Add": 0, "Sub": 0, "Div": 1}[op]
    if isinstance(y, Const) and y == identity:
        return x
    if op in ("Mul", "Add") and isinstance(x, Const) and x == identity:
        return y
    return None

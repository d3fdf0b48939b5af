"""Where a no-cache decoder reads token positions, found by what its values compute.

A cached graph must take positions from ``position_ids``: a decode step at
position 40 runs a chunk of one token, and whatever the exporter derived from
the chunk's shape (``Range(0, seq)``) or from the attention mask
(``cumsum(mask) - 1``, OPT's ``+ 2``) would restart at 0. Exporters spell
this a dozen ways (rank, broadcast layout, casts, offsets, ``* mask``), so
nothing here matches a spelling. Instead:

1. **Dependencies.** Each value is classified by what it reads: token data
   (``input_ids``' values), the attention mask's values, or only shapes
   (``Shape``/``Size`` outputs read no values).
2. **Frontier.** Where a value that reads no token data enters a node whose
   result does (at a data operand, not a shape operand such as Reshape's
   target), it carries information into the model: rotary cos/sin, a
   learned position embedding, a scale computed from a shape. Attention
   masks are excluded: the masks are read by :mod:`kv_cache_probe`.
3. **Probing.** Every frontier value is run on probe masks of two lengths.
   One without an axis of the sequence's length must not change with it
   (a scale); one with such an axis is a function of the token positions.
4. **Positions.** In the slice of each position-dependent frontier value,
   every value that reads only the mask and shapes is probed too; those that
   *are* positions -- ``pos + c`` in any broadcast layout ([S], [1, S],
   [1, S, 1], [B, S], ...) where pos is either the column (counted from the
   chunk start) or ``cumsum(mask) - 1`` -- are candidates. The pass replaces
   the ones closest to the frontier that have a batch axis with
   ``position_ids`` laid out the same way.

The rewrite is then checked by running it (:func:`verify_rewired`), on
padded probes and on a chunk that starts in the middle of a sequence: a
subgraph that reads the total length some other way (a table sliced to the
sequence length) fails there, with the value named, instead of producing a
wrong graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
from qgraph_passes.kv_cache.probe import (
    CONCAT_PAST,
    ProbeError,
    backward_slice,
    empty_past,
    longest_runnable,
    run_slice,
    shape_cuts,
)

__all__ = [
    "TOKENS",
    "MASK",
    "SHAPE",
    "FrontierValue",
    "PositionSite",
    "PositionAnalysis",
    "analyze_positions",
    "dependencies",
    "retype_downstream",
    "site_replacement",
    "table_replacement",
    "tabulate",
    "verify_rewired",
]

TOKENS, MASK, SHAPE = 1, 2, 4
#: Probe lengths: unlike any head count, head size or window of the zoo or of common models.
_L1, _L2 = 11, 13
_ROWS = 3

# Operands that are shapes, axes or bounds rather than data: a value read there
# parameterizes the computation; what it carries is checked through the data it shapes.
_SHAPE_OPERANDS: dict[str, set[int]] = {
    "Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Tile": {1}, "Unsqueeze": {1}, "Squeeze": {1},
    "ConstantOfShape": {0}, "Pad": {1, 3}, "Split": {1}, "CumSum": {1}, "TopK": {1}, "Resize": {1, 2, 3},
    "OneHot": {1}, "Trilu": {1}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "ReduceProd": {1}, "ReduceL2": {1}, "ReduceSumSquare": {1}, "Range": {0, 1, 2},
}
_SHAPE_ONLY_OPS = {"Shape", "Size"}

Semantics = Literal["column", "mask"]


def dependencies(graph: ir.Graph, ids: ir.Value, mask: ir.Value | None) -> dict[ir.Value, int]:
    """TOKENS / MASK / SHAPE bits of every value (graph order; constants read nothing)."""
    deps: dict[ir.Value, int] = {ids: TOKENS}
    if mask is not None:
        deps[mask] = MASK
    for node in graph:
        bits = 0
        for x in node.inputs:
            if x is not None:
                bits |= deps.get(x, 0)
        if node.op_type in _SHAPE_ONLY_OPS and node.domain in ("", "ai.onnx"):
            bits = SHAPE if bits else 0
        for out in node.outputs:
            deps[out] = bits
    return deps


@dataclasses.dataclass
class FrontierValue:
    """A value that reads no token data, entering a node whose result does."""

    value: ir.Value
    consumer: ir.Node
    seq_axis: int | None = None  # the axis of the sequence's length, None for a length-independent value


@dataclasses.dataclass
class PositionSite:
    """A value equal to ``pos + offset`` in a broadcast layout: replaced by ``position_ids`` laid out alike."""

    value: ir.Value
    rank: int
    seq_axis: int
    batch_axis: int  # -1: the layout has none before the sequence axis; the replacement prepends one
    offset: int
    semantics: Semantics

    def describe(self) -> str:
        pos = "column" if self.semantics == "column" else "cumsum(mask) - 1"
        off = f" {'+' if self.offset >= 0 else '-'} {abs(self.offset)}" if self.offset else ""
        return f"{self.value.name!r} = {pos}{off} (rank {self.rank}, seq axis {self.seq_axis})"


@dataclasses.dataclass
class PositionAnalysis:
    frontier: list[FrontierValue]
    sites: list[PositionSite]
    #: the original values of the position-dependent frontier values on the padded probe of length _L1
    probed: dict[ir.Value, np.ndarray]
    valid: np.ndarray
    #: and on one unpadded row of length _L1
    unpadded: dict[ir.Value, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def semantics(self) -> set[str]:
        return {s.semantics for s in self.sites}


def _data_operands(node: ir.Node) -> list[tuple[int, ir.Value]]:
    skip = _SHAPE_OPERANDS.get(node.op_type, set()) if node.domain in ("", "ai.onnx") else set()
    return [(i, x) for i, x in enumerate(node.inputs) if x is not None and i not in skip]


def find_frontier(graph: ir.Graph, deps: dict[ir.Value, int], *, skip_nodes: set[ir.Node]) -> list[FrontierValue]:
    """Non-token values read as data by nodes whose results depend on token data."""
    seen: set[ir.Value] = set()
    out: list[FrontierValue] = []
    for node in graph:
        if node in skip_nodes:
            continue
        if not any(deps.get(o, 0) & TOKENS for o in node.outputs):
            continue
        if node.op_type in _SHAPE_ONLY_OPS:
            continue
        for index, x in _data_operands(node):
            bits = deps.get(x, 0)
            if bits and not bits & TOKENS and x not in seen:
                if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and index == 3:
                    continue  # the attention mask: read by the mask probe
                seen.add(x)
                out.append(FrontierValue(x, node))
    return out


def probe_inputs(graph: ir.Graph, valid: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds of the probe rows ``valid``: tokens, their mask, and a concat source's cache, empty.

    A graph that already has a concat cache is its own no-cache graph when
    the past is empty, and the exporter may read the past length from the
    cache's shape (``cache_position`` starts at it), so its cache inputs are
    fed too, with no slots (the pass makes such reads read an empty cache,
    ``KVCachePass._empty_past_dims``).
    """
    feeds = {}
    for value in graph.inputs:
        dtype = value.dtype.numpy() if value.dtype is not None else np.int64
        if value.name == "attention_mask":
            feeds[value.name] = valid.astype(dtype)
        elif value.name == "input_ids":
            feeds[value.name] = np.zeros(valid.shape, dtype)
        elif value.name is not None and CONCAT_PAST.match(value.name):
            feeds[value.name] = empty_past(value, valid.shape[0])
    return feeds


def probe_rows(length: int) -> np.ndarray:
    """bool [3, length]: no padding, left padding, right padding."""
    cols = np.arange(length)
    pad = max(1, length // 3)
    return np.stack([np.ones(length, bool), cols >= pad, cols < length - pad])


def _seq_axes(a1: np.ndarray, a2: np.ndarray) -> list[int] | None:
    """Axes that have the probe's length in both runs; None when other axes differ between them."""
    if a1.ndim != a2.ndim:
        return None
    axes = []
    for axis, (d1, d2) in enumerate(zip(a1.shape, a2.shape)):
        if d1 == _L1 and d2 == _L2:
            axes.append(axis)
        elif d1 != d2:
            return None
    return axes


def _as_site(value: ir.Value, array: np.ndarray, valid: np.ndarray) -> PositionSite | None:
    """``value`` as a position site when its probe equals pos + c in some broadcast layout."""
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        return None
    length = valid.shape[1]
    seq = [a for a, d in enumerate(array.shape) if d == length]
    if len(seq) != 1:
        return None
    k = seq[0]
    others = [a for a in range(array.ndim) if a != k]
    rows_axes = [a for a in others if array.shape[a] == _ROWS]
    if any(array.shape[a] not in (1, _ROWS) for a in others) or len(rows_axes) > 1:
        return None
    if rows_axes and rows_axes[0] > k:
        return None
    if rows_axes:
        batch_axis = rows_axes[0]
    elif k > 0:
        batch_axis = 0
    else:
        batch_axis = -1  # no axis before the sequence to carry the batch ([S], [S, 1]): one is prepended
    if batch_axis < 0:
        moved = np.moveaxis(array, k, 0).reshape(1, length)
    else:
        moved = np.moveaxis(array, [batch_axis, k], [0, 1]).reshape(array.shape[batch_axis], length)
    values = moved.astype(np.float64)
    column = np.broadcast_to(np.arange(length, dtype=np.float64), values.shape)
    diff = values - column
    if np.all(diff == diff.flat[0]) and float(diff.flat[0]).is_integer():
        return PositionSite(value, array.ndim, k, batch_axis, int(diff.flat[0]), "column")
    if values.shape[0] != _ROWS:
        return None
    counted = np.cumsum(valid, axis=1) - 1
    diff = (values - counted)[valid]
    if diff.size and np.all(diff == diff[0]) and float(diff[0]).is_integer():
        return PositionSite(value, array.ndim, k, batch_axis, int(diff[0]), "mask")
    return None


def _closest_sites(target: ir.Value, sites: dict[ir.Value, PositionSite], deps: dict[ir.Value, int]) -> list[ir.Value]:
    """The sites on the paths into ``target`` that no other site lies between and ``target``."""
    chosen, stack, seen = [], [target], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        if value in sites:  # (the frontier value itself may be one: it is then replaced directly)
            chosen.append(value)
            continue
        node = value.producer()
        if node is None:
            continue
        for _, x in _data_operands(node):
            if deps.get(x, 0) & (MASK | SHAPE):
                stack.append(x)
    return chosen


def analyze_positions(model: ir.Model, ids: ir.Value, mask: ir.Value) -> PositionAnalysis:
    """Find the frontier, probe it and find the position sites. Raises ProbeError naming what fails."""
    graph = model.graph
    deps = dependencies(graph, ids, mask)
    frontier = find_frontier(graph, deps, skip_nodes=set())
    if not frontier:
        return PositionAnalysis([], [], {}, probe_rows(_L1))
    v1, v2 = probe_rows(_L1), probe_rows(_L2)
    values = [f.value for f in frontier]
    # The candidates are every value in the frontier's slices that reads the mask or shapes, not tokens;
    # one session computes them and the frontier on all three probes.
    nodes, _, _ = backward_slice(graph, values, cut=shape_cuts(model)[1])
    in_frontier = set(values)
    candidates = [o for n in nodes for o in n.outputs
                  if deps.get(o, 0) and not deps[o] & TOKENS and o not in in_frontier
                  and o.dtype is not None and o.dtype != ir.DataType.BOOL]
    feeds = [probe_inputs(graph, v) for v in (v1, v2, np.ones((1, _L1), bool))]
    try:
        runs = run_slice(model, values + candidates, feeds)
    except ProbeError as exc:
        raise ProbeError(f"could not run the values that carry positions into the model: {exc}") from None
    a1, a2, whole = (run[: len(values)] for run in runs)
    by_value = dict(zip(values + candidates, runs[0]))
    dependent: list[FrontierValue] = []
    probed: dict[ir.Value, np.ndarray] = {}
    for f, x1, x2 in zip(frontier, a1, a2):
        axes = _seq_axes(np.asarray(x1), np.asarray(x2))
        name = f"{f.value.name!r} (read by {f.consumer.op_type} {f.consumer.name!r})"
        if axes is None:
            raise ProbeError(f"{name} changes shape with the sequence length along no single axis")
        if not axes:
            if not np.array_equal(x1, x2, equal_nan=True):
                raise ProbeError(f"{name} has no sequence axis but its value changes with the sequence length")
            continue
        if len(axes) > 1:
            raise ProbeError(f"{name} has {len(axes)} axes of the sequence's length (a relative position bias?); "
                             "the pass rebuilds per-token positions only")
        f.seq_axis = axes[0]
        dependent.append(f)
        probed[f.value] = np.asarray(x1)
    if not dependent:
        return PositionAnalysis(frontier, [], probed, v1)
    sites = {}
    for value in candidates + [f.value for f in dependent]:
        site = _as_site(value, np.asarray(by_value[value]), v1)
        if site is not None:
            sites[value] = site
    chosen: dict[ir.Value, PositionSite] = {}
    for f in dependent:
        closest = _closest_sites(f.value, sites, deps)
        if not closest:
            array = probed[f.value]
            if np.all(array == np.take(array, [0], axis=f.seq_axis)):
                continue  # the same at every position: computed from the chunk's shape it stays right
            name = f"{f.value.name!r} (read by {f.consumer.op_type} {f.consumer.name!r})"
            if deps.get(f.value, 0) & MASK:
                raise ProbeError(f"{name} is computed from the attention mask's values and is not a function of the "
                                 "token positions; a cached graph has no such mask to compute it from")
            raise ProbeError(f"{name} varies along the sequence, but no value it is computed from equals the token "
                             "positions")
        for value in closest:
            chosen[value] = sites[value]
    if len({s.semantics for s in chosen.values()}) > 1:
        raise ProbeError("the graph counts positions both from the chunk start and from the mask: "
                         + "; ".join(s.describe() for s in chosen.values()))
    unpadded = {f.value: np.asarray(a) for f, a in zip(frontier, whole) if f.seq_axis is not None}
    return PositionAnalysis(frontier, list(chosen.values()), probed, v1, unpadded)


def site_replacement(b, site: PositionSite, clamped: ir.Value) -> ir.Value:
    """``position_ids`` ([B, S], clamped at 0) + offset, laid out and typed as ``site``."""
    value = clamped
    if site.offset:
        value = b.op("Add", value, b.const(site.offset))
    if site.batch_axis < 0:  # a batch axis is prepended: [S, ...] becomes [B, S, ...]
        axes = [a + 1 for a in range(site.rank) if a != site.seq_axis]
    else:
        axes = [a for a in range(site.rank) if a not in (site.batch_axis, site.seq_axis)]
    if axes:
        value = b.op("Unsqueeze", value, b.const(axes))
    if site.value.dtype is not None and site.value.dtype != ir.DataType.INT64:
        value = b.op("Cast", value, to=site.value.dtype)
    return value


def verify_rewired(
    rewired: ir.Model,
    analysis: PositionAnalysis,
    replacements: dict[ir.Value, ir.Value],
    *,
    chunk_mask: Literal["none", "total"],
    shapes_declared: bool = True,
) -> None:
    """Run each position-dependent frontier value of the rewired graph against the original.

    * on the padded probe rows, fed the positions the sites' meaning gives;
    * on a chunk of 3 tokens starting at position 6, against the original's
      values at columns 6..8 of an unpadded sequence.

    Raises ProbeError naming the first value that differs.
    """
    dependent = [f for f in analysis.frontier if f.seq_axis is not None]
    if not dependent:
        return
    new_values = [replacements.get(f.value, f.value) for f in dependent]
    valid = analysis.valid
    column = len(analysis.sites) > 0 and all(s.semantics == "column" for s in analysis.sites)
    positions = (np.broadcast_to(np.arange(valid.shape[1]), valid.shape) if column
                 else np.where(valid, np.cumsum(valid, axis=1) - 1, -1))
    padded = {"input_ids": np.zeros(valid.shape, np.int64), "position_ids": positions.astype(np.int64),
              "attention_mask": valid.astype(np.int64)}
    # A chunk in the middle of a sequence: tokens at positions start .. start + 2.
    start, size = 6, 3
    chunk = {"input_ids": np.zeros((1, size), np.int64),
             "position_ids": np.arange(start, start + size, dtype=np.int64)[None]}
    if chunk_mask == "total":
        chunk["attention_mask"] = np.ones((1, start + size), np.int64)
    try:
        got, in_chunk = run_slice(rewired, new_values, [padded, chunk], shapes_from_inputs=shapes_declared)
    except ProbeError as exc:
        raise ProbeError(f"the rewired position subgraph does not run on padded rows or on a chunk after a past "
                         f"of {start} tokens: {exc}") from None
    for f, array in zip(dependent, got):
        _compare(f, analysis.probed[f.value], np.asarray(array), valid if not column else None, "padded probe rows")
    for f, array in zip(dependent, in_chunk):
        expected = np.take(analysis.unpadded[f.value], np.arange(start, start + size), axis=f.seq_axis)
        _compare(f, expected, np.asarray(array), None, f"a chunk at positions {start}..{start + size - 1}")


def _compare(f: FrontierValue, expected: np.ndarray, got: np.ndarray, valid: np.ndarray | None, where: str) -> None:
    name = f"{f.value.name!r} (read by {f.consumer.op_type} {f.consumer.name!r})"
    try:
        shape = np.broadcast_shapes(expected.shape, got.shape)
    except ValueError:
        raise ProbeError(f"{name}: rebuilt from position_ids it has shape {got.shape}, the original "
                         f"{expected.shape} ({where})") from None
    e, g = np.broadcast_to(expected, shape), np.broadcast_to(got, shape)
    close = np.isclose(e.astype(np.float64), g.astype(np.float64), rtol=1e-5, atol=1e-5)
    if valid is not None:
        k = f.seq_axis
        # valid tokens: [rows, S] laid along the value's batch (first rows-sized axis) and sequence axes
        mask_shape = [1] * len(shape)
        batch_axis = next((a for a in range(len(shape)) if a != k and shape[a] == valid.shape[0]), None)
        if batch_axis is not None:
            mask_shape[batch_axis], mask_shape[k] = valid.shape
            layout = valid if batch_axis < k else valid.T
            close = close | ~np.broadcast_to(layout.reshape(mask_shape), shape)
        else:  # no batch axis: the value is shared by the rows, so compare where every row is valid
            close = close | ~np.broadcast_to(np.expand_dims(valid.all(axis=0), [a for a in range(len(shape)) if a != k]), shape)
    if not close.all():
        index = tuple(int(i) for i in np.argwhere(~close)[0])
        raise ProbeError(f"{name}: rebuilt from position_ids it differs from the original on {where} at {index}: "
                         f"{g[index]!r} instead of {e[index]!r}")


def retype_downstream(replacements: Sequence[ir.Value], opset_imports) -> dict[ir.Value, ir.Shape | None]:
    """Re-infer the shapes after replacements of another rank, as far as they change; returns the old shapes."""
    from qgraph.node_types import infer_output_types

    stack = list(replacements)
    seen: set[ir.Node] = set()
    old_shapes: dict[ir.Value, ir.Shape | None] = {}
    while stack:
        value = stack.pop()
        for use in value.uses():
            node = use.node
            if node in seen:
                continue
            seen.add(node)
            before = [o.shape for o in node.outputs]
            for out in node.outputs:
                old_shapes.setdefault(out, out.shape)
                out.shape = None
            infer_output_types(node, opset_imports)
            for out, old in zip(node.outputs, before):
                if out.shape != old:
                    stack.append(out)
    return old_shapes


def tabulate(model: ir.Model, dependent: Sequence[FrontierValue], length: int) -> tuple[int, list[np.ndarray]]:
    """Each value on one unpadded row of ``length`` tokens -- or of the longest length the graph runs.

    A value that is a function of the token's position alone is then a table
    indexed by position (what QEfficient's rotary cos/sin caches are): the
    fallback when its subgraph cannot take per-row positions (a reshape that
    hard-codes the traced batch of 1). A learned position table bounds the
    length the graph runs; bisection finds it.
    """
    values = [f.value for f in dependent]

    def attempt(n: int) -> list[np.ndarray] | ProbeError:
        try:
            return [np.asarray(a) for a in run_slice(model, values, probe_inputs(model.graph, np.ones((1, n), bool)))]
        except ProbeError as exc:
            return exc

    rows, tables = longest_runnable(attempt, length)
    if rows is None:
        raise ProbeError(f"the position-dependent values do not run on one row: {tables}")
    return rows, tables


def table_replacement(b, f: FrontierValue, table: np.ndarray, clamped: ir.Value) -> ir.Value:
    """``Gather(table, position_ids)`` laid out as ``f``: the batch where f has a size-1 axis before the sequence."""
    k = f.seq_axis
    assert k is not None
    batch = next((a for a in range(k) if table.shape[a] == 1), None)
    rest = [a for a in range(table.ndim) if a not in (batch, k)]
    rows = table.transpose([k, *rest, *([batch] if batch is not None else [])])
    if batch is not None:
        rows = rows.reshape(rows.shape[:-1])
    np_dtype = rows.dtype
    gathered = b.op("Gather", b.const(rows, dtype=np_dtype, hint="position_table"), clamped, axis=0)
    # Gather gives [B, S, *rest]; put B and S where f has them (B first when f has no batch axis).
    labels = ["B", "S", *rest]
    if batch is None:
        target = ["B", *[("S" if a == k else a) for a in range(table.ndim)]]
    else:
        target = [("B" if a == batch else "S" if a == k else a) for a in range(table.ndim)]
    perm = [labels.index(t) for t in target]
    if perm != list(range(len(perm))):
        gathered = b.op("Transpose", gathered, perm=perm)
    return gathered

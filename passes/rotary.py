"""Rotary embedding fusion: the half-rotation form becomes one ``RotaryEmbedding`` (opset 23).

What the rules recognize (docs/design.md, "canonicalize"), every sum and
product in either operand order::

    rotate_half(x) = Concat(-x[..., D/2:], x[..., :D/2], axis=-1)
    y = x * cos + rotate_half(x) * sin                  -> RotaryEmbedding(x, cos', sin')
    Concat(RotaryEmbedding(x[..., :r], c, s), x[..., r:])
                                                        -> RotaryEmbedding(x, c, s, rotary_embedding_dim=r)

``x`` is ``[B, H, S, D]`` (the layout after the head transpose); ``cos`` and
``sin`` are ``[B | 1, 1, S, D]`` tables whose halves are equal by
construction (``cos(cat(freqs, freqs))``, read by ``rotary_tables``);
``cos'`` is their first half without the head axis, ``[B, S, D/2]``,
expanded to x's batch and sequence dims where shape inference does not show
them equal (a table shared by the batch; TorchScript's unrelated symbols). The second rule makes a
partial rotary (Phi, GPT-NeoX's ``rotary_pct``: only the first r of the D
channels turn) one node: the first rule has already fused the rotated
slice, and the pass-through channels are put back by ``rotary_embedding_dim``.

Not fused, and reported (which node, which check failed): slices that are
not the two halves of the last axis, a table whose halves are not known to
be equal (its first half would not be what the graph multiplies by), a table
that is not ``[B | 1, 1, S | 1, D]``, an unknown or odd head size.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.opset_upgrade import opset_at_least
from qgraph_passes.rotary_tables import halves_equal_reason
from qgraph_passes.shape_values import static_dim, static_value

from qgraph import RewritePass, Rule, RuleSet
from qgraph.rewrite import explain
from qgraph.rewrite.pattern import Var

__all__ = ["RotaryFusionPass", "RULES"]

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_INT64_MAX = np.iinfo(np.int64).max


# -- patterns ------------------------------------------------------------------


def _last_axis_slice(op, x, prefix):
    """x[..., start:end] with or without an explicit step (the condition reads them)."""
    start, end, axes, steps = (Var(f"{prefix}_{k}") for k in ("start", "end", "axes", "steps"))
    return op.Slice(x, start, end, axes, steps) | op.Slice(x, start, end, axes)


def rotary(op, x, cos, sin):
    rotated = op.Concat(op.Neg(_last_axis_slice(op, x, "hi")), _last_axis_slice(op, x, "lo"), axis=op.capture("cat_axis"))
    return op.Add(op.Mul(x, cos, _commute=True), op.Mul(rotated, sin, _commute=True), _commute=True)


def partial_rotary(op, q, cos, sin):
    turned = op.RotaryEmbedding(_last_axis_slice(op, q, "rot"), cos, sin, interleaved=0)
    return op.Concat(turned, _last_axis_slice(op, q, "pass"), axis=op.capture("cat_axis"))


# -- conditions ----------------------------------------------------------------


def _int(match, name: str) -> int | None:
    value = match.get(name) if name in match else None
    if value is None:
        return None
    array = static_value(value)  # a constant, or computed from x's static head size (TorchScript's x.shape[-1] // 2)
    array = np.asarray(array).reshape(-1) if array is not None else np.zeros(0)
    return int(array[0]) if array.size == 1 else None


def _slice_reason(match, prefix: str, start: int, end: int, width: int) -> str | None:
    """Why the slice named ``prefix`` is not x[..., start:end] of a last axis ``width`` wide, if it is not."""
    got = {k: _int(match, f"{prefix}_{k}") for k in ("start", "end", "axes")}
    steps = _int(match, f"{prefix}_steps") if f"{prefix}_steps" in match else 1
    if None in got.values() or steps is None:
        return (f"a Slice of x has starts/ends/axes that are not one number each, from constants and static dims "
                f"({prefix} half)")
    if got["axes"] not in (-1, 3) or steps != 1:
        return f"a Slice of x runs over axis {got['axes']} with step {steps}, not the last axis with step 1"
    got_end = got["end"] if got["end"] < width or got["end"] > _INT64_MAX // 2 else width
    got_end = min(got_end, width) if got_end >= 0 else width + got_end
    got_start = got["start"] if got["start"] >= 0 else width + got["start"]
    if (got_start, got_end) != (start, end):
        return f"a Slice of x takes [{got['start']}:{got['end']}] of the last axis, not [{start}:{end}]"
    return None


def _head_size(x: ir.Value) -> int | str:
    if x.dtype not in _FLOATS:
        return f"'{x.name}' is {x.dtype}, not float32/float16/bfloat16"
    if x.shape is None or len(x.shape) != 4:
        return f"'{x.name}' is not known to be 4-D [B, H, S, D]"
    # static_dim: TorchScript's heads reshape leaves the head size symbolic in the stored shape
    d = static_dim(x, 3)
    if not isinstance(d, int) or d % 2:
        return f"the head size of '{x.name}' is {x.shape[3] if d is None else d}, not a known even number"
    return d


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _table_reason(table: ir.Value, x: ir.Value, d: int, what: str) -> str | None:
    if table.dtype != x.dtype:
        return f"the {what} table '{table.name}' is {table.dtype}, x is {x.dtype}"
    if table.shape is None or len(table.shape) != 4:
        return f"the {what} table '{table.name}' is not known to be 4-D [B, 1, S, D]"
    dims = table.shape.dims
    if dims[1] != 1 or dims[3] != d:
        return f"the {what} table '{table.name}' has shape {table.shape}, not [B, 1, S, {d}]"
    reason = halves_equal_reason(table)
    return None if reason is None else f"the {what} table's two halves are not known to be equal: {reason}"


def check_rotary(match, x, cos, sin, cat_axis) -> str | None:
    d = _head_size(x)
    if isinstance(d, str):
        return d
    if cat_axis not in (-1, 3):
        return f"rotate_half concatenates on axis {cat_axis}, not the last"
    for prefix, start, end in (("hi", d // 2, d), ("lo", 0, d // 2)):
        reason = _slice_reason(match, prefix, start, end, d)
        if reason is not None:
            return reason
    for table, what in ((cos, "cos"), (sin, "sin")):
        reason = _table_reason(table, x, d, what)
        if reason is not None:
            return reason
    match["half"] = d // 2
    # RotaryEmbedding reads one table row per (batch, position) of x; where shape inference does not
    # show the table's batch and sequence dims to be x's, the table is expanded to them, as Mul broadcast it.
    match["broadcast"] = not all(_same_dim(t.shape[i], x.shape[i]) for t in (cos, sin) for i in (0, 2))
    return None


def check_partial(match, q, cat_axis) -> str | None:
    d = _head_size(q)
    if isinstance(d, str):
        return d
    if cat_axis not in (-1, 3):
        return f"the pass-through channels are concatenated on axis {cat_axis}, not the last"
    inner = next(n for n in match.nodes if n.op_type == "RotaryEmbedding")
    # num_heads / rotary_embedding_dim have no schema default, so the pattern cannot say "absent"
    if any(inner.attributes.get(name) is not None and inner.attributes[name].value
           for name in ("num_heads", "rotary_embedding_dim")):
        return f"the inner RotaryEmbedding '{inner.name}' already sets num_heads or rotary_embedding_dim"
    rot = _int(match, "rot_end")
    if rot is None or not 0 < rot < d or rot % 2:
        return f"the rotated slice ends at {rot}, not an even channel inside the head size {d}"
    for prefix, start, end in (("rot", 0, rot), ("pass", rot, d)):
        reason = _slice_reason(match, prefix, start, end, d)
        if reason is not None:
            return reason
    match["rot"] = rot
    return None


# -- replacements --------------------------------------------------------------


def _first_half(op, table, x, half: int, broadcast: bool):
    # Constant nodes, not initializers: cse merges equal Constant nodes, so the layers' copies of
    # this slice of one shared table become one.
    def ints(*v):
        return op.Constant(value_ints=list(v))

    first = op.Squeeze(op.Slice(table, ints(0), ints(half), ints(-1)), ints(1))
    first.shape = ir.Shape([table.shape[0], table.shape[2], half])  # inference does not read Constant-node axes
    if not broadcast:
        return first
    shape = op.Concat(op.Shape(x, start=0, end=1), op.Shape(x, start=2, end=3), op.Constant(value_ints=[half]), axis=0)
    expanded = op.Expand(first, shape)
    expanded.shape = ir.Shape([x.shape[0], x.shape[2], half])
    return expanded


def to_rotary(op, x, cos, sin, half, broadcast):
    return op.RotaryEmbedding(x, _first_half(op, cos, x, half, broadcast), _first_half(op, sin, x, half, broadcast))


def to_partial(op, q, cos, sin, rot):
    return op.RotaryEmbedding(q, cos, sin, rotary_embedding_dim=rot)


def _example_table(op, freqs, trig):
    """What the condition must find behind a table: trig(cat(freqs, freqs)) with a head axis added."""
    return op.Unsqueeze(trig(op.Concat(freqs, freqs, axis=-1)), np.array([1], np.int64))


_EXAMPLE_INPUTS = {"x": (ir.DataType.FLOAT, ("B", 3, "S", 8)), "freqs": (ir.DataType.FLOAT, ("B", "S", 4))}
_EXAMPLE_VALUES = {
    "cos": lambda op, freqs: _example_table(op, freqs, op.Cos),
    "sin": lambda op, freqs: _example_table(op, freqs, op.Sin),
    "hi_start": np.array([4], np.int64), "hi_end": np.array([_INT64_MAX], np.int64),
    "hi_axes": np.array([-1], np.int64), "hi_steps": np.array([1], np.int64),
    "lo_start": np.array([0], np.int64), "lo_end": np.array([4], np.int64),
    "lo_axes": np.array([-1], np.int64), "lo_steps": np.array([1], np.int64),
    "cat_axis": -1,
}
_EXAMPLE_PARTIAL_INPUTS = {"q": (ir.DataType.FLOAT, ("B", 3, "S", 8)), "cos": (ir.DataType.FLOAT, ("B", "S", 2)),
                           "sin": (ir.DataType.FLOAT, ("B", "S", 2))}
_EXAMPLE_PARTIAL = {
    "rot_start": np.array([0], np.int64), "rot_end": np.array([4], np.int64),
    "rot_axes": np.array([-1], np.int64), "rot_steps": np.array([1], np.int64),
    "pass_start": np.array([4], np.int64), "pass_end": np.array([_INT64_MAX], np.int64),
    "pass_axes": np.array([-1], np.int64), "pass_steps": np.array([1], np.int64),
    "cat_axis": -1,
}

RULES = RuleSet(
    [
        Rule("rotary-half", rotary, to_rotary, check_rotary, opsets={"": 23},
             doc="x*cos + rotate_half(x)*sin -> RotaryEmbedding(x, cos[..., :D/2], sin[..., :D/2])",
             example_inputs=_EXAMPLE_INPUTS, example_values=_EXAMPLE_VALUES),
        # keep_shared: a table expanded to the rotated slice's shape still reads that slice's Shape.
        Rule("rotary-partial", partial_rotary, to_partial, check_partial, opsets={"": 23}, keep_shared=True,
             doc="Concat(RotaryEmbedding(x[..., :r]), x[..., r:]) -> RotaryEmbedding(x, rotary_embedding_dim=r)",
             example_inputs=_EXAMPLE_PARTIAL_INPUTS, example_values=_EXAMPLE_PARTIAL),
    ],
    name="rotary",
)


class RotaryFusionPass(RewritePass):
    """Fuse rotary position embedding (half-rotation form, full or partial) into RotaryEmbedding (opset 23).

    The rule table is ``RULES``; the module docstring shows the forms.
    Candidates left unfused -- a ``rotate_half``-shaped Concat the rules
    looked at and refused -- are listed in the report notes with the check
    that failed. The interleaved (GPT-J) form is not recognized yet.
    """

    name = "rotary"
    near_miss_notes = False  # every refused candidate gets its own note below
    rules = RULES
    prerequisites = (opset_at_least(23),)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if not any(node.op_type == "Neg" for node in ir.traversal.RecursiveGraphIterator(model.graph)):
            return result  # no rotate_half left to explain: skip the second sweep
        for cand in explain(model, RuleSet([RULES.get("rotary-half")], name=self.name)):
            # The root Add and one product match any residual x*a + y; a candidate that got the
            # second product too is an x*a + y*b, the shape of a rotary: its refusal is worth reading.
            if not cand.matched and cand.nodes_matched > 2:
                where = f"{cand.graph}/{cand.node}" if cand.graph else cand.node
                self.report.notes.append(f"rotary candidate '{where}' not fused: {cand.reason}")
        return result

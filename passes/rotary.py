"""Rotary embedding fusion: the half-rotation and interleaved forms become one ``RotaryEmbedding`` (opset 23).

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

The interleaved form (GPT-J's and CodeGen's ``rotate_every_two``: channels
2i and 2i+1 turn together) is ``rotary_interleaved``'s rule, recognized by
running what the subgraph computes; its ``[B, S, H, D]`` rotation (GPT-J)
is wrapped in transposes, ``rotary-partial-heads-second`` is the partial
rule for that wrapping, and ``rotary-heads-back`` merges the transpose back
to ``[B, S, H, D]`` with the model's own transpose right after (GPT-J's
``permute(0, 2, 1, 3)`` cancels it).

Not fused, and reported (which node, which check failed): slices that are
not the two halves of the last axis, a table whose halves are not known to
be equal (its first half would not be what the graph multiplies by), a table
that is not ``[B | 1, 1, S | 1, D]``, an unknown or odd head size; for the
interleaved form, a pairing that is not rotate_every_two (shown channel by
channel), a table whose entries are not proven to come in pairs, a chain
that does more than move elements or cannot be run on a probe.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.opset_upgrade import opset_at_least
from qgraph_passes.rotary_interleaved import INTERLEAVED_RULE, check_interleaved, rotation_operands, unrewritten_reason
from qgraph_passes.rotary_operands import head_size, heads_first, same_dim
from qgraph_passes.rotary_tables import halves_equal_reason
from qgraph_passes.shape_values import static_value

from qgraph import RewritePass, Rule, RuleSet
from qgraph.rewrite import explain
from qgraph.rewrite.pattern import Var

__all__ = ["RotaryFusionPass", "RULES"]

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
    turned = op.RotaryEmbedding(_last_axis_slice(op, q, "rot"), cos, sin, interleaved=op.capture("interleaved"))
    return op.Concat(turned, _last_axis_slice(op, q, "pass"), axis=op.capture("cat_axis"))


def partial_rotary_heads_second(op, q, cos, sin):
    """The partial form on [B, S, H, D] (GPT-J rotates before moving the heads in front): the rotated
    slice went through the transposes the interleaved rule puts around RotaryEmbedding."""
    inner = op.Transpose(_last_axis_slice(op, q, "rot"), perm=[0, 2, 1, 3])
    turned = op.RotaryEmbedding(inner, cos, sin, interleaved=op.capture("interleaved"))
    return op.Concat(op.Transpose(turned, perm=[0, 2, 1, 3]), _last_axis_slice(op, q, "pass"),
                     axis=op.capture("cat_axis"))


def heads_back_and_forth(op, y):
    """The transpose put after a [B, S, H, D] rotation, then the model's own transpose (GPT-J's permute of q,
    or of k straight to [B, H, D, S] for the scores)."""
    return op.Transpose(op.Transpose(y, perm=[0, 2, 1, 3]), perm=op.capture("outer"))


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
    d = head_size(x)
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
    match["broadcast"] = not all(same_dim(t.shape[i], x.shape[i]) for t in (cos, sin) for i in (0, 2))
    return None




def check_partial(match, q, cat_axis) -> str | None:
    d = head_size(q)
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


def check_heads_back(y, outer) -> str | None:
    producer = y.producer()
    if producer is None or producer.op_type != "RotaryEmbedding":
        return f"'{y.name}' is not a RotaryEmbedding output (only the transposes this pass adds are taken back)"
    if outer is None or sorted(outer) != [0, 1, 2, 3]:
        return f"the outer Transpose's perm {outer} is not a permutation of 4 axes"
    return None


# -- replacements --------------------------------------------------------------


def composed_transpose(op, y, outer):
    """Transpose(Transpose(y, [0,2,1,3]), outer) is one Transpose of y, or y itself."""
    perm = [[0, 2, 1, 3][axis] for axis in outer]
    if perm == [0, 1, 2, 3]:
        return y
    moved = op.Transpose(y, perm=perm)
    if y.shape is not None:
        moved.shape = ir.Shape([y.shape[axis] for axis in perm])
    return moved


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








def to_partial(op, q, cos, sin, rot, interleaved):
    return op.RotaryEmbedding(q, cos, sin, rotary_embedding_dim=rot, interleaved=interleaved)


def to_partial_heads_second(op, q, cos, sin, rot, interleaved):
    turned = op.RotaryEmbedding(heads_first(op, q), cos, sin, rotary_embedding_dim=rot, interleaved=interleaved)
    return heads_first(op, turned)


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
    "cat_axis": -1, "interleaved": 0,
}
_EXAMPLE_PARTIAL_BSHD_INPUTS = {**_EXAMPLE_PARTIAL_INPUTS, "q": (ir.DataType.FLOAT, ("B", "S", 3, 8))}

RULES = RuleSet(
    [
        Rule("rotary-half", rotary, to_rotary, check_rotary, opsets={"": 23},
             doc="x*cos + rotate_half(x)*sin -> RotaryEmbedding(x, cos[..., :D/2], sin[..., :D/2])",
             example_inputs=_EXAMPLE_INPUTS, example_values=_EXAMPLE_VALUES),
        INTERLEAVED_RULE,  # rotary_interleaved.py
        # keep_shared: a table expanded to the rotated slice's shape still reads that slice's Shape.
        Rule("rotary-partial", partial_rotary, to_partial, check_partial, opsets={"": 23}, keep_shared=True,
             doc="Concat(RotaryEmbedding(x[..., :r]), x[..., r:]) -> RotaryEmbedding(x, rotary_embedding_dim=r)",
             example_inputs=_EXAMPLE_PARTIAL_INPUTS, example_values=_EXAMPLE_PARTIAL),
        Rule("rotary-partial-heads-second", partial_rotary_heads_second, to_partial_heads_second, check_partial,
             opsets={"": 23}, keep_shared=True,
             doc="Concat(T(RotaryEmbedding(T(x[..., :r]))), x[..., r:]) -> T(RotaryEmbedding(T(x), rotary_embedding_dim=r))",
             example_inputs=_EXAMPLE_PARTIAL_BSHD_INPUTS, example_values=_EXAMPLE_PARTIAL),
        # [0, 2, 1, 3] is its own inverse: the rotation's way back and the model's way forward cancel
        # keep_shared: TorchScript also reads the Shape of the transpose back; that one stays for it.
        Rule("rotary-heads-back", heads_back_and_forth, composed_transpose, check_heads_back, keep_shared=True,
             doc="Transpose(Transpose(RotaryEmbedding(..), [0,2,1,3]), p) -> Transpose(RotaryEmbedding(..), [0,2,1,3][p])",
             example_inputs={"x": (ir.DataType.FLOAT, ("B", 3, "S", 8)), "c": (ir.DataType.FLOAT, ("B", "S", 4)),
                             "s": (ir.DataType.FLOAT, ("B", "S", 4))},
             example_values={"y": lambda op, x, c, s: op.RotaryEmbedding(x, c, s, interleaved=1),
                             "outer": [0, 2, 3, 1]}),
    ],
    name="rotary",
)


class RotaryFusionPass(RewritePass):
    """Fuse rotary position embedding (half or interleaved, full or partial) into RotaryEmbedding (opset 23).

    The rule table is ``RULES``; the module docstring shows the forms.
    Candidates left unfused -- a ``rotate_half``-shaped Concat the rules
    looked at and refused, or an ``x*a + y*b`` whose ``y`` is moved and
    negated channels of ``x`` that is not a provable rotate_every_two --
    are listed in the report notes with the check that failed.
    """

    name = "rotary"
    near_miss_notes = False  # every refused candidate gets its own note below
    rules = RULES
    prerequisites = (opset_at_least(23),)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if self.report.rule_matches.get("rotary-interleaved"):
            # The interleaved rule binds the rotated channels as one value, so the ops that moved them
            # are not part of the match: nothing reads them now, and they go here, not in a later pass.
            ir.passes.common.RemoveUnusedNodesPass()(model)
        # One note per refused candidate: the interleaved rule's reason where the rotated value is
        # moved channels of x that are not rotate_half, the half rule's otherwise.
        interleaved = self._interleaved_refusals(model)
        if not any(node.op_type == "Neg" for node in ir.traversal.RecursiveGraphIterator(model.graph)):
            self.report.notes.extend(interleaved.values())
            return result  # no rotate_half left to explain (it negates half the channels): skip that sweep
        for cand in explain(model, RuleSet([RULES.get("rotary-half")], name=self.name)):
            # The root Add and one product match any residual x*a + y; a candidate that got the
            # second product too is an x*a + y*b, the shape of a rotary: its refusal is worth reading.
            if not cand.matched and cand.nodes_matched > 2 and cand.node not in interleaved:
                where = f"{cand.graph}/{cand.node}" if cand.graph else cand.node
                self.report.notes.append(f"rotary candidate '{where}' not fused: {cand.reason}")
        self.report.notes.extend(interleaved.values())
        return result

    def _interleaved_refusals(self, model: ir.Model) -> dict[str, str]:
        """x*a + y*b where y is moved (and negated) channels of x, not fused: which check failed, by Add node.

        The rule's own near miss would name the first operand order tried, not the one where y
        comes from x; here that order is found first, then the rule's condition is asked why.
        """
        notes = {}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            operands = rotation_operands(node) if node.op_type == "Add" else None
            if operands is None:
                continue
            reason = check_interleaved({}, *operands) or unrewritten_reason(node)
            if "rotate_half" not in reason:  # a rotate_half is the half rule's to explain
                where = f"{node.graph.name}/{node.name}" if node.graph is not model.graph else node.name
                notes[node.name] = f"interleaved rotary candidate '{where}' not fused: {reason}"
        return notes



"""The interleaved rotary form (GPT-J's and CodeGen's ``rotate_every_two``) -> ``RotaryEmbedding(interleaved=1)``.

Channels 2i and 2i+1 turn together::

    y = x * cos + rotated * sin     where rotated[..., 2i] = -x[..., 2i+1], rotated[..., 2i+1] = x[..., 2i]
                                    and cos[..., 2i] = cos[..., 2i+1] (likewise sin)
                                                        -> RotaryEmbedding(x, cos[..., ::2], sin[..., ::2], interleaved=1)

The rule is recognized by what the subgraph computes, not by how an
exporter spells it: ``rotated`` binds any value, and the condition runs the
chain of element-moving ops and Neg from ``x`` to it on a probe
(``channel_probe``) to read which channel of x each channel holds, with its
sign; the tables' repetition in pairs is proven the same way
(``rotary_tables.repeated_pairs``). GPT-J rotates q and k as
``[B, S, H, D]``, before moving the heads in front; the probe's table shape
tells the layout (its head axis is 1 whatever the batch and sequence), and
the fused node is then wrapped in the two transposes RotaryEmbedding's 4-D
``[B, H, S, D]`` input needs.

Refused, with the check that failed: a pairing that is not rotate_every_two
(shown channel by channel), a table whose entries are not proven to come in
pairs, a chain that does more than move elements or cannot be run on a
probe, an unknown or odd head size. Because the pattern binds any value for
``rotated``, the rule's own near miss names the first operand order tried;
:func:`rotation_operands` finds the order in which ``rotated`` comes from
``x``, so the pass can ask the condition why in that order.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.channel_probe import ChannelMap, channel_map, reaches
from qgraph_passes.rotary_operands import head_size, heads_first, same_dim
from qgraph_passes.rotary_tables import repeated_pairs

from qgraph import Rule

__all__ = ["INTERLEAVED_RULE", "check_interleaved", "rotation_operands", "unrewritten_reason"]

_INT64_MAX = np.iinfo(np.int64).max


def interleaved_rotary(op, x, cos, sin, rotated):
    # ``rotated`` binds any value: the condition proves by running that it is rotate_every_two(x)
    return op.Add(op.Mul(x, cos, _commute=True), op.Mul(rotated, sin, _commute=True), _commute=True)


def _rotate_every_two(d: int) -> ChannelMap:
    """out[2i] = -x[2i+1], out[2i+1] = x[2i] (GPT-J's rotate_every_two)."""
    return ChannelMap(tuple(j ^ 1 for j in range(d)), tuple(-1 if j % 2 == 0 else 1 for j in range(d)))


def _rotate_half(d: int) -> ChannelMap:
    h = d // 2
    return ChannelMap(tuple((j + h) % d for j in range(d)), tuple(-1 if j < h else 1 for j in range(d)))


def check_interleaved(match, x, cos, sin, rotated) -> str | None:
    """x*cos + rotate_every_two(x)*sin, the pairing and both tables proven on probes (channel_probe)."""
    if rotated is x or not reaches(rotated, x):
        return f"'{rotated.name}' is not computed from '{x.name}' by moving its channels"
    d = head_size(x)
    if isinstance(d, str):
        return d
    pairing = channel_map(x, rotated)
    if isinstance(pairing, str):
        return f"the channels of '{rotated.name}' could not be read from '{x.name}': {pairing}"
    if pairing == _rotate_half(d):
        return f"'{rotated.name}' is rotate_half of '{x.name}' (the rotary-half rule's form), not rotate_every_two"
    if pairing != _rotate_every_two(d):
        shown = ", ".join(f"{'-' if s < 0 else ''}x[{p}]" for p, s in zip(pairing.perm[:8], pairing.sign[:8]))
        return f"'{rotated.name}' is not rotate_every_two of '{x.name}': its channels hold {shown}{', ...' if d > 8 else ''}"
    shapes = []
    for table, what in ((cos, "cos"), (sin, "sin")):
        if table.dtype != x.dtype:
            return f"the {what} table '{table.name}' is {table.dtype}, x is {x.dtype}"
        paired = repeated_pairs(table)
        if isinstance(paired, str):
            return f"the {what} table's entries are not known to come in pairs: {paired}"
        if len(paired.probe_shape) != 4 or paired.probe_shape[3] != d:
            return f"the {what} table '{table.name}' has shape {list(paired.probe_shape)} at the probe, not 4-D ending in {d}"
        shapes.append(paired.probe_shape)
    # The table's head axis is the one that is 1 whatever the batch and sequence (the probe draws those > 1).
    heads = [axis for axis in (1, 2) if shapes[0][axis] == 1]
    if len(heads) != 1 or [a for a in (1, 2) if shapes[1][a] == 1] != heads:
        return f"the tables' head axis cannot be told (shapes {list(shapes[0])} and {list(shapes[1])} at the probe)"
    match["heads_axis"], match["d"] = heads[0], d
    seq = 3 - heads[0]  # [B, 1, S, D] or [B, S, 1, D]; x is laid out the same way
    match["broadcast"] = not all(t.shape is not None and same_dim(t.shape[i], x.shape[i]) for t in (cos, sin)
                                 for i in (0, seq))
    return None


def _even_entries(op, table, x, heads_axis: int, d: int, broadcast: bool):
    """The table's entries 0, 2, 4, ... without the head axis, [B, S, D/2] (RotaryEmbedding's interleaved cos/sin)."""
    def ints(*v):
        return op.Constant(value_ints=list(v))

    seq = 3 - heads_axis
    rows = op.Squeeze(op.Slice(table, ints(0), ints(d), ints(-1), ints(2)), ints(heads_axis))
    dims = table.shape.dims if table.shape is not None and len(table.shape) == 4 else (None,) * 4
    rows.shape = ir.Shape([dims[0], dims[seq], d // 2])
    if not broadcast:
        return rows
    shape = op.Concat(op.Shape(x, start=0, end=1), op.Shape(x, start=seq, end=seq + 1),
                      op.Constant(value_ints=[d // 2]), axis=0)
    expanded = op.Expand(rows, shape)
    expanded.shape = ir.Shape([x.shape[0], x.shape[seq], d // 2])
    return expanded


def to_interleaved(op, x, cos, sin, heads_axis, d, broadcast):
    c, s = (_even_entries(op, t, x, heads_axis, d, broadcast) for t in (cos, sin))
    if heads_axis == 1:
        return op.RotaryEmbedding(x, c, s, interleaved=1)
    # [B, S, H, D]: RotaryEmbedding reads a 4-D input as [B, H, S, D], so the heads move in front and back
    return heads_first(op, op.RotaryEmbedding(heads_first(op, x), c, s, interleaved=1))


def _example_pairs(op, freqs, trig):
    """repeat_interleave(trig(freqs), 2) on the last axis, with a head axis: [B, S, 1, D]."""
    column = op.Unsqueeze(freqs, np.array([-1], np.int64))
    pairs = op.Concat(column, column, axis=-1)
    return trig(op.Reshape(op.Unsqueeze(pairs, np.array([2], np.int64)), np.array([0, 0, 1, -1], np.int64)))


def _example_every_two(op, x):
    """stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2), as GPT-J writes rotate_every_two."""
    def half(start):
        return op.Slice(x, np.array([start], np.int64), np.array([_INT64_MAX], np.int64), np.array([-1], np.int64),
                        np.array([2], np.int64))
    stacked = op.Concat(op.Unsqueeze(op.Neg(half(1)), np.array([-1], np.int64)),
                        op.Unsqueeze(half(0), np.array([-1], np.int64)), axis=-1)
    return op.Reshape(stacked, np.array([0, 0, 0, -1], np.int64))


_EXAMPLE_INTERLEAVED_INPUTS = {"x": (ir.DataType.FLOAT, ("B", "S", 3, 8)), "freqs": (ir.DataType.FLOAT, ("B", "S", 4))}
_EXAMPLE_INTERLEAVED = {
    "cos": lambda op, freqs: _example_pairs(op, freqs, op.Cos),
    "sin": lambda op, freqs: _example_pairs(op, freqs, op.Sin),
    "rotated": lambda op, x: _example_every_two(op, x),
}


INTERLEAVED_RULE = Rule(
    "rotary-interleaved", interleaved_rotary, to_interleaved, check_interleaved, opsets={"": 23},
    doc="x*cos + rotate_every_two(x)*sin -> RotaryEmbedding(x, cos[..., ::2], sin[..., ::2], interleaved=1)",
    example_inputs=_EXAMPLE_INTERLEAVED_INPUTS, example_values=_EXAMPLE_INTERLEAVED)


def unrewritten_reason(add: ir.Node) -> str:
    """Why an Add whose checks pass is still there: the rule rewrites only products read by the Add alone."""
    for value in add.inputs:
        users = [user.name for user, _ in value.uses() if user is not add]
        if value.is_graph_output():
            users.append("the graph's outputs")
        if users:
            return f"its checks pass, but the product '{value.name}' is also read by {users}"
    return "its checks pass, but the rule did not rewrite it (--explain rotary-interleaved shows the match)"


def rotation_operands(add: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value] | None:
    """(x, cos, sin, rotated) of an ``x*cos + rotated*sin`` whose ``rotated`` is computed from x element by element
    (moved, negated, scaled), if it is one."""
    products = [v.producer() if v is not None else None for v in add.inputs]
    if len(products) != 2 or not all(p is not None and p.op_type == "Mul" and len(p.inputs) == 2 for p in products):
        return None
    for first, second in (products, products[::-1]):
        for x, cos in (first.inputs, first.inputs[::-1]):
            for rotated, sin in (second.inputs, second.inputs[::-1]):
                if x is not None and rotated is not None and rotated is not x and reaches(rotated, x, elementwise=True):
                    return x, cos, sin, rotated
    return None

"""Whether a rotary cos/sin table repeats its first half in its second half.

The half-rotation form of rotary embedding multiplies ``x`` by a table of
width D whose two halves are equal (``emb = cat(freqs, freqs)``, then
``cos(emb)``); ``RotaryEmbedding`` takes only the first half. Slicing the
table is exact only if that is so, and it cannot be seen in the table's
shape: it is read from how the table was made. The walk goes up through
ops that act on each element alone or on axes other than the last (casts,
cos/sin, scaling by a scalar, adding an axis in front) to a
``Concat(a, a)`` on the last axis. Anything else is answered with the
value where the walk stopped, so a rule can say why it did not fuse.

The interleaved form (GPT-J's ``rotate_every_two``) pairs channels 2i and
2i+1 and multiplies both by one table entry, repeated in pairs
(``repeat_interleave(t, 2)``); ``RotaryEmbedding(interleaved=1)`` takes the
table's even entries. :func:`repeated_pairs` proves the repetition by
running what made the table: the chain of ops that only move elements
(Tile / Expand + Reshape, Concat + Reshape, ...) and of element-wise ops
(cos, casts) is run on a probe (``channel_probe``, the element-wise ops as
Identity), and entries 2i and 2i+1 must be the same element of its
source, everywhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from qgraph_passes.channel_probe import movement_source, probe

__all__ = ["PairedTable", "halves_equal_reason", "repeated_pairs"]

# Ops that compute each output element from the same-position input element.
_ELEMENTWISE = frozenset({"Cast", "Cos", "Sin", "Neg", "Identity"})
# Binary ops that keep equal halves equal when the other operand is one number.
_SCALAR_BINARY = frozenset({"Mul", "Div", "Add", "Sub"})
_MAX_DEPTH = 16


def _is_scalar_constant(value: ir.Value | None) -> bool:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return tensor is not None and tensor.size == 1


def _last_axis(node: ir.Node, rank: int | None) -> bool:
    attr = node.attributes.get("axis")
    axis = attr.value if attr is not None else 0
    return axis == -1 or (rank is not None and axis == rank - 1)


def _unsqueezes_in_front(node: ir.Node) -> bool:
    """An Unsqueeze that adds only axes before the last one keeps the last axis as it is."""
    axes = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
    out = node.outputs[0]
    if axes is None or out.shape is None:
        return False
    rank = len(out.shape)
    return all((int(a) % rank) != rank - 1 for a in np.asarray(axes.numpy()).reshape(-1))


def halves_equal_reason(value: ir.Value) -> str | None:
    """None if ``value``'s last axis is ``[t, t]`` by construction, else why that is not known."""
    current = value
    for _ in range(_MAX_DEPTH):
        node = current.producer()
        if node is None:
            return f"'{current.name}' is not computed in the graph (a table input or weight is not read)"
        if node.domain not in ("", "ai.onnx"):
            return f"'{current.name}' comes from {node.domain}::{node.op_type}"
        op = node.op_type
        if op == "Concat":
            rank = len(current.shape) if current.shape is not None else None
            if len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and _last_axis(node, rank):
                return None
            return f"'{current.name}' is a Concat, but not of one value with itself on the last axis"
        if op in _ELEMENTWISE:
            current = node.inputs[0]
        elif op in _SCALAR_BINARY and len(node.inputs) == 2:
            a, b = node.inputs
            if _is_scalar_constant(b):
                current = a
            elif _is_scalar_constant(a):
                current = b
            else:
                return f"'{current.name}' is a {op} of two tensors"
        elif op == "Unsqueeze" and _unsqueezes_in_front(node):
            current = node.inputs[0]
        else:
            return f"'{current.name}' comes from {op}, which may not keep the table's halves equal"
    return f"'{value.name}': more than {_MAX_DEPTH} ops between the table and its Concat"


@dataclasses.dataclass(frozen=True)
class PairedTable:
    """A table whose last axis is ``[t0, t0, t1, t1, ...]``, with its shape at the probe."""

    probe_shape: tuple[int, ...]  #: symbolic dims drawn as distinct primes; a literal 1 stays 1
    source: str  #: the value the repetition starts from


def repeated_pairs(table: ir.Value) -> PairedTable | str:
    """The table's repetition in pairs on the last axis, proven on a probe; else why it is not known."""
    source = movement_source(table)
    if source is table:
        node = table.producer()
        made_by = f"{node.op_type} '{node.name}'" if node is not None else "outside the graph"
        return f"'{table.name}' is not made by repeating the entries of a table (it comes from {made_by})"
    run = probe(source, table, allow_neg=False, skip_elementwise=True)
    if isinstance(run, str):
        return run
    out = run.target
    if out.ndim == 0 or out.shape[-1] % 2:
        return f"'{table.name}' has {out.shape[-1] if out.ndim else 0} entries on its last axis at the probe, not an even number"
    if not np.array_equal(out[..., 0::2], out[..., 1::2]):
        return f"'{table.name}' does not repeat each entry of '{source.name}' twice in a row on its last axis"
    return PairedTable(tuple(int(d) for d in out.shape), source.name)

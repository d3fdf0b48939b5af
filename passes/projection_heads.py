"""A layer's q, k and v recognised as heads of a fused projection's columns, by running their data movement.

attention-io packs heads it sees as ``heads(x3) = Transpose(Reshape(x3,
[B, S, H, D]), [0, 2, 1, 3])`` of a ``[B, S, H*D]`` projection, and
GroupQueryAttention wants q, k and v that way. Models that project q, k and
v with one MatMul cut the heads out of its output in other ways:

- Falcon (multi-query): ``view`` as ``[B, S, Hq + 2, D]``, split the heads
  axis ``[Hq, 1, 1]``;
- GPT-BigCode (multi-query): ``unsqueeze`` to ``[B, 1, S, C]``, split the
  last axis ``[Hq*D, D, D]``, reshape q to heads;
- GPT-NeoX: ``view`` as ``[B, S, H, 3*D]``, split the last axis in three:
  each head's q, k and v columns lie side by side (``[h0: q, k, v]...``).

Rather than matching those spellings, each operand ``t`` of the Attention
(under its rotation and its cache Concat) is run on a probe
(:mod:`qgraph_passes.channel_probe`) from the projection ``p`` (``[B, S,
C]``) where its data movement starts: the probe shows which element of p
each ``t[b, h, s, d]`` holds. When that is ``p[b, s, c[h, d]]``, one column
map ``c`` at every b and s, at two draws of B and S, then ``t`` is
``heads(Gather(p, c.ravel(), axis=-1))`` exactly. The columns of q, k and v
side by side, in that order, are then either

- one run of p's columns ``[a, a + n)``: the heads are a ``Split`` of p
  (Falcon, GPT-BigCode), or
- a reorder of them: ``Split(Gather(p, perm, axis=-1))``, and the Gather is
  folded into the projection's weight and bias
  (:mod:`qgraph_passes.column_permutation`; GPT-NeoX) -- or, where it
  cannot be, kept and reported.

The layer's output is treated the same way: a data movement from the
Attention's ``[B, Hq, S, D]`` output to a ``[B, S, Hq*D]`` value that the
probe shows to be ``merge(y)`` (TorchScript exports reshape y once more
with shapes read at run time) becomes ``Reshape(Transpose(y), [0, 0,
Hq*D])``. Only cached layers (the K/V cache concatenated on the keys) are
looked at, and only where an operand is not yet ``heads(x3)``; a layer whose
probe fails is left as it was, and the note names the operand and the check.
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir
from qgraph_passes.attention_contract import remove_dead
from qgraph_passes.channel_probe import MOVEMENT, movement_source, probe
from qgraph_passes.column_permutation import fold_column_gather
from qgraph_passes.fresh_names import FreshNames

__all__ = ["read_heads_from_projections"]

_HEADS = (0, 2, 1, 3)
# Two draws of the symbolic dims (batch, sequence, ...): what is read must not depend on the sizes drawn.
_DRAWS = ((2, 3, 5, 7, 11, 13, 17, 19), (3, 5, 7, 11, 13, 17, 19, 23))
# A fused projection of a large model is wide (3 x 6144 columns): the probe's source holds B x S x C numbers.
_MAX_ELEMENTS = 1 << 22
_MAX_MERGE_STEPS = 6


def _default(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _new_part(value: ir.Value) -> ir.Value | None:
    """The new keys (or values) of a cache Concat along the sequence axis; None if ``value`` is not one."""
    node = value.producer()
    if _default(node, "Concat") and len(node.inputs) == 2 and _attr(node, "axis") in (2, -2):
        return node.inputs[1]
    return None


def _unrotated(value: ir.Value) -> ir.Value:
    node = value.producer()
    return node.inputs[0] if _default(node, "RotaryEmbedding") else value


def _is_heads(value: ir.Value) -> bool:
    """Whether ``value`` is already ``Transpose(Reshape(x3), [0, 2, 1, 3])`` of a 3-D x3 (attention-io's form)."""
    node = value.producer()
    if not _default(node, "Transpose") or tuple(_attr(node, "perm", ())) != _HEADS:
        return False
    reshape = node.inputs[0].producer()
    x3 = reshape.inputs[0] if _default(reshape, "Reshape") else None
    return x3 is not None and x3.shape is not None and len(x3.shape) == 3


def _operands(node: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """q, k and v of a cached layer under their rotations and cache Concats; None if the layer is not cached."""
    q, k, v = node.inputs[:3]
    if len(node.inputs) >= 6 and node.inputs[4] is not None and node.inputs[5] is not None:
        new_k, new_v = k, v
    else:
        new_k, new_v = _new_part(k), _new_part(v)
        if new_k is None or new_v is None:
            return None
    return _unrotated(q), _unrotated(new_k), new_v


def _columns(source: ir.Value, target: ir.Value) -> np.ndarray | str:
    """``c[h, d]``: the column of ``source`` ([B, S, C]) each ``target[b, h, s, d]`` holds, the same at every b, s."""
    found = []
    for primes in _DRAWS:
        run = probe(source, target, allow_neg=False, primes=primes, max_elements=_MAX_ELEMENTS)
        if isinstance(run, str):
            return run
        out, shape = run.target, run.source.shape
        if out.ndim != 4 or out.shape[0] != shape[0] or out.shape[2] != shape[1]:
            return (f"'{target.name}' is {list(out.shape)} at a probe where '{source.name}' is {list(shape)}: "
                    "not [B, H, S, D] of its B and S")
        b, s, c = np.unravel_index(out.astype(np.int64) - 1, shape)
        if not (np.all(b == np.arange(shape[0])[:, None, None, None])
                and np.all(s == np.arange(shape[1])[None, None, :, None])):
            return f"'{target.name}' mixes the batch or sequence positions of '{source.name}'"
        columns = c[0, :, 0, :]
        if not np.all(c == columns[None, :, None, :]):
            return f"'{target.name}' reads different columns of '{source.name}' at different positions"
        found.append(columns)
    if found[0].shape != found[1].shape or not np.array_equal(found[0], found[1]):
        return f"the columns '{target.name}' reads of '{source.name}' change with the sizes drawn"
    return found[0]


def _merged(y: ir.Value, z: ir.Value) -> str | None:
    """Why ``z`` ([B, S, H*D]) is not ``merge(y)`` of the Attention output ``y`` ([B, H, S, D]), if it is not."""
    for primes in _DRAWS:
        run = probe(y, z, allow_neg=False, primes=primes, max_elements=_MAX_ELEMENTS)
        if isinstance(run, str):
            return run
        expected = np.transpose(run.source, _HEADS).reshape(run.source.shape[0], run.source.shape[2], -1)
        if run.target.shape != expected.shape or not np.array_equal(run.target, expected):
            return f"'{z.name}' is not the heads of '{y.name}' merged (a probe of {list(run.source.shape)})"
    return None


def _constant(graph: ir.Graph, names: FreshNames, array: np.ndarray, base: str) -> ir.Value:
    name = names(base)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype, value.shape = value.const_value.dtype, ir.Shape(list(array.shape))
    graph.register_initializer(value)
    return value


class _Builder:
    """New nodes of one layer, placed in order right after a given node (or first in the graph)."""

    def __init__(self, graph: ir.Graph, names: FreshNames, prefix: str, after: ir.Node | None) -> None:
        self.graph, self.names, self.prefix, self.after = graph, names, prefix, after

    def add(self, op: str, inputs, shapes, dtype, **attributes) -> list[ir.Value]:
        node = ir.node(op, inputs, attributes=attributes, num_outputs=len(shapes),
                       name=self.names(f"{self.prefix}/{op}"))
        for out, shape in zip(node.outputs, shapes, strict=True):
            out.name, out.dtype, out.shape = self.names(f"{self.prefix}/{op}"), dtype, ir.Shape(shape)
        if self.after is None:
            first = next(iter(self.graph), None)
            self.graph.insert_before(first, node) if first is not None else self.graph.append(node)
        else:
            self.graph.insert_after(self.after, node)
        self.after = node
        return list(node.outputs)

    def const(self, array: np.ndarray, what: str) -> ir.Value:
        return _constant(self.graph, self.names, array, f"{self.prefix}/{what}")


def _layer_heads(graph: ir.Graph, names: FreshNames, node: ir.Node,
                 operands: tuple[ir.Value, ...]) -> tuple[list[str], str | None]:
    """Rewrite the layer's operands as heads of its projections' columns: (what was done, why not)."""
    sources, maps = [], []
    for t, what in zip(operands, "qkv", strict=True):
        if t.shape is None or len(t.shape) != 4:
            return [], f"{what} '{t.name}' is not known to be 4-D"
        source = movement_source(t)
        if source is t or source.shape is None or len(source.shape) != 3:
            return [], (f"{what} '{t.name}' is not moved out of a [B, S, C] projection "
                        f"(its data starts at '{source.name}')")
        columns = _columns(source, t)
        if isinstance(columns, str):
            return [], f"{what}: {columns}"
        sources.append(source)
        maps.append(columns)
    for source in dict.fromkeys(sources):
        at = [i for i, s in enumerate(sources) if s is source]
        width = source.shape[2]
        taken = np.concatenate([maps[i].ravel() for i in at])
        if not isinstance(width, int) or len(set(taken.tolist())) != len(taken):
            return [], f"'{source.name}': a column is read by two heads, or its width is not static"
    # checked for every operand before any is rewritten; operands of one projection are cut together
    return [_cut(graph, names, node, source, [operands[i] for i, s in enumerate(sources) if s is source],
                 [maps[i] for i, s in enumerate(sources) if s is source]) for source in dict.fromkeys(sources)], None


def _cut(graph: ir.Graph, names: FreshNames, node: ir.Node, source: ir.Value, operands: list[ir.Value],
         maps: list[np.ndarray]) -> str:
    """Replace ``operands`` (heads of ``source``'s columns ``maps``) by ``heads`` of a Split of those columns."""
    width = source.shape[2]
    taken = np.concatenate([m.ravel() for m in maps])
    b, s = source.shape[0], source.shape[1]
    build = _Builder(graph, names, f"{node.name}/heads", source.producer())
    start = int(taken[0])
    if np.array_equal(taken, np.arange(start, start + len(taken))):
        cut, how = source, f"columns [{start}, {start + len(taken)}) of '{source.name}'"
        sizes = [start, *(m.size for m in maps), width - start - len(taken)]
    else:
        rest = np.setdiff1d(np.arange(width), taken)
        perm = np.concatenate([taken, rest]).astype(np.int64)
        (cut,) = build.add("Gather", [source, build.const(perm, "columns")], [[b, s, width]], source.dtype, axis=-1)
        how = f"'{source.name}' reordered head by head"
        sizes = [0, *(m.size for m in maps), len(rest)]
    keep = [i for i, n in enumerate(sizes) if n]
    if len(keep) == 1:
        parts = [cut]
    else:
        parts = build.add("Split", [cut, build.const(np.array([sizes[i] for i in keep], np.int64), "sizes")],
                          [[b, s, sizes[i]] for i in keep], source.dtype, axis=-1)
    parts = [parts[keep.index(i + 1)] for i in range(len(maps))]
    for t, x3, columns in zip(operands, parts, maps, strict=True):
        h, d = columns.shape
        (split,) = build.add("Reshape", [x3, build.const(np.array([0, 0, h, d], np.int64), "heads_shape")],
                             [[b, s, h, d]], source.dtype)
        (heads,) = build.add("Transpose", [split], [[b, h, s, d]], source.dtype, perm=list(_HEADS))
        old = t.producer()
        t.replace_all_uses_with(heads)
        remove_dead(graph, [old])
    if cut is not source:
        reason = fold_column_gather(graph, cut.producer())
        how += " in its weights" if reason is None else f" by a Gather (kept: {reason})"
    return how


def _merge_chain(y: ir.Value) -> list[ir.Value]:
    """The 3-D values the Attention output's data moves through (Shape reads aside), nearest first."""
    value, found = y, []
    for _ in range(_MAX_MERGE_STEPS):
        readers = [u.node for u in value.uses() if not _default(u.node, "Shape")]
        if len(readers) != 1 or readers[0].op_type not in MOVEMENT or readers[0].inputs[0] is not value:
            break
        value = readers[0].outputs[0]
        if value.shape is not None and len(value.shape) == 3:
            found.append(value)
    return found


def _merge_output(graph: ir.Graph, names: FreshNames, node: ir.Node) -> str | None:
    """Give the Attention output a plain merge when its data moves to [B, S, Hq*D] some other way; a note.

    The merge is the first 3-D value on the way that the probe shows to be ``merge(y)`` (a batched-heads
    core, Bloom's, passes a [B*H, S, D] view first)."""
    q, _k, v = _operands(node)  # heads(x3) now: their shapes are the projections' dims
    b, heads, s, size = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    y = node.outputs[0]
    y.shape = ir.Shape([b, heads, s, size])  # what Attention gives: q's batch, heads and length, v's head size
    chain = _merge_chain(y)
    if not chain:
        return None
    first = next(u.node for u in y.uses() if not _default(u.node, "Shape"))
    z = chain[0]
    if (_default(first, "Transpose") and tuple(_attr(first, "perm", ())) == _HEADS
            and z.producer().inputs[0] is first.outputs[0] and z.shape[2] == heads * size):
        return None  # already Reshape(Transpose(y)) to a known width: attention-io reads it as it is
    reasons = []
    for z in chain:
        reason = f"'{z.name}' is a graph output" if z.is_graph_output() else _merged(y, z)
        if reason is None:
            break
        reasons.append(reason)
    else:
        return f"the output merge kept: {'; '.join(reasons)}"
    build = _Builder(graph, names, f"{node.name}/merge", node)
    (moved,) = build.add("Transpose", [y], [[b, s, heads, size]], y.dtype, perm=list(_HEADS))
    (merged,) = build.add("Reshape", [moved, build.const(np.array([0, 0, heads * size], np.int64), "shape")],
                          [[b, s, heads * size]], y.dtype)
    old = z.producer()
    z.replace_all_uses_with(merged)
    remove_dead(graph, [old])
    return "the output merged by one Transpose and Reshape"


def read_heads_from_projections(model: ir.Model) -> tuple[int, list[str]]:
    """Rewrite every cached layer whose q, k, v are heads of fused projections; (layers rewritten, notes)."""
    graph = model.graph
    names = FreshNames(graph)
    count, notes = 0, []
    for node in list(graph):
        if not _default(node, "Attention"):
            continue
        operands = _operands(node)
        if operands is None or all(_is_heads(t) for t in operands):
            continue
        done, reason = _layer_heads(graph, names, node, operands)
        if reason is not None:
            notes.append(f"Attention '{node.name}': q, k, v not read as heads of a projection: {reason}")
            continue
        merge = _merge_output(graph, names, node)
        count += 1
        notes.append(f"Attention '{node.name}': q, k, v read as heads of {'; '.join(done)}"
                     + (f"; {merge}" if merge else ""))
    return count, notes

"""Shape arithmetic answered where it is proven: Reshape targets as constants, Shape reads of inputs' dims.

A user's plain export and qgraph's own compute the same layer with different
shape bookkeeping, and the rules that follow (attention-io's packed heads,
lower-gqa) read the bookkeeping:

* TorchScript splits the heads with ``Reshape(q, Concat(Shape(h)[0],
  Shape(h)[1], -1, 16))``: onnx shape inference cannot say that the result is
  ``[B, S, 4, 16]`` of q's own B and S, so attention-io's ``heads`` check
  fails on every layer ("not known to be [B, S, H*D] -> [B, S, H, D]").
* The rotary pass broadcasts a batch-1 cos/sin table (a plain export counts
  positions itself, one row for the batch) to the rotated tensor's shape
  with ``Expand(table, Concat(Shape(q_heads)[0], Shape(q_heads)[2], D/2))``:
  those ``Shape`` reads of the head-split Transpose are uses outside
  attention-io's pattern, which then refuses to move the heads.

What both need is to know where a dim comes from, which
:mod:`qgraph_passes.dim_sources` proves op by op (a graph input's dim, or a
number). With that this pass rewrites, each step exact for every input:

* ``Reshape(x, t)`` with ``t`` computed at run time: when every entry of t
  is a number or x's own dim at that axis, t becomes a constant (0 for a
  copied dim, with allowzero 0; a -1 resolved when x's other dims are
  numbers), and the output's declared shape says so. A Reshape whose target
  copies every dim of x is x itself and is removed.
* ``Shape(v)[a:b]`` whose dims all come from numbers or from graph inputs'
  dims reads those inputs (``Shape(input_ids)[0:1]``) or becomes a constant,
  so it no longer holds on to an intermediate. The q and k tables of a
  layer, and of every layer, then compute the same value, which ``cse``
  merges into one.
* a Slice proven to keep everything is its input, and a Concat operand
  proven empty is dropped (:mod:`qgraph_passes.whole_slices`: Phi-3's
  TorchScript rotary of ``x[..., :d]``, d read from the cos table).
* every declared dim with a proven source is renamed after it (the input's
  dim name, or the number), so checks that compare declared shapes see the
  equalities the ops guarantee.

Run before ``kv-cache``: the sources are read from the exporter's declared
shapes, which later passes may leave stale (a table of batch 1 that the
cache's ``position_ids`` widen to the batch).
"""

from __future__ import annotations

import types

import numpy as np
import onnx_ir as ir
from qgraph_passes.dim_sources import Const, DimSources, InputDim
from qgraph_passes.fresh_names import FreshNames
from qgraph_passes.whole_slices import drop_whole_slices_and_empty_operands

from qgraph import Pass
from qgraph.rewrite_pass import summarize_near_misses

__all__ = ["ShapeReadsPass"]


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and ir.convenience.get_const_tensor(value) is not None


def _constant(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype, value.shape = value.const_value.dtype, ir.Shape(list(array.shape))
    graph.register_initializer(value)
    return value


def _describe(source: Const | InputDim | None) -> str:
    if source is None:
        return "not proven"
    return str(int(source)) if isinstance(source, Const) else f"dim {source.axis} of '{source.value.name}'"


def _why_kept(dims: DimSources, node: ir.Node) -> str:
    """Why a Reshape's run-time target is not proven equal to a constant one (the names quoted, the ops not).

    The quoted names are blanked in the near-miss summary, so the reason
    groups by what failed; the notes keep them. No apostrophes outside the
    quotes: the summary's blanking pairs quotes.
    """
    x = node.inputs[0]
    entries = dims.entries(node.inputs[1])
    if x is None or x.shape is None:
        return "its input's rank is not known"
    if entries is None:
        breaking = dims.breaking_op(node.inputs[1])
        if breaking is None:
            return f"its target '{node.inputs[1].name}' is not computed from constants and dims"
        return (f"its target '{node.inputs[1].name}' is computed through {breaking.op_type} '{breaking.name}', "
                "which dim_sources does not follow")
    for axis, entry in enumerate(entries):
        if entry is None:
            return f"entry {axis} of its target is not proven to be a number or a graph input's dim"
        if isinstance(entry, InputDim) and dims.source(x, axis) != entry:
            return (f"entry {axis} of its target is dim {entry.axis} of '{entry.value.name}', not proven equal to "
                    f"dim {axis} of the reshaped value '{x.name}' (of rank {len(x.shape)}; that dim is "
                    f"{_describe(dims.source(x, axis))})")
    return "its target has more than one -1, or a 0 that allowzero makes a zero-sized dim"


class ShapeReadsPass(Pass):
    """Answer shape arithmetic where it is proven: Reshape targets as constants, Shape reads of the inputs' dims.

    The module docstring says what is rewritten and why each step is exact;
    the proofs are :mod:`qgraph_passes.dim_sources`.
    """

    name = "shape-reads"
    explained_rules = ("reshape-target",)

    def explain(self, model: ir.Model, rule: str) -> list[tuple[bool, str]]:
        """Every Reshape with a run-time target and what the pass does with it, found by running it on a copy."""
        copy = type(self)(**self.config)
        copy(model.clone())
        return copy._candidates

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        dims = DimSources(graph)
        self._names = FreshNames(graph)
        self._kept: list[types.SimpleNamespace] = []
        self._candidates: list[tuple[bool, str]] = []  # for --explain reshape-target
        changed = False
        standard = [node for node in graph if node.domain in ("", "ai.onnx")]
        # Shape reads first: a Reshape whose output only they read (TorchScript's repeat_kv, read for its
        # head size) is then unused, and a target left at run time there costs nothing (dce removes it).
        for node in standard:
            if node.op_type == "Shape" and node.inputs[0] is not None and node.inputs[0] not in graph.inputs:
                changed |= self._shape(graph, dims, node)
        for node in standard:
            if node.op_type == "Reshape" and len(node.inputs) > 1 and not _is_const(node.inputs[1]):
                changed |= self._reshape(graph, dims, node)
        # a rotary over the whole head written for a partial one: cat(rotate(x[..., :D]), x[..., D:]) is rotate(x)
        slices, operands = drop_whole_slices_and_empty_operands(graph, dims)
        for rule, n in (("whole-slices", slices), ("empty-operands", operands)):
            if n:
                self.report.count(rule, n)
                changed = True
        if self._kept:  # the table's "near miss in shape-reads" line: how many targets, the most common reason
            self.report.near_misses = summarize_near_misses({"reshape-target": self._kept})
            self.report.near_misses["reshape-target"]["listed_by"] = (
                "--explain reshape-target names each; a kept target is computed at run time, with the same result")
        renamed = self._name_dims(graph, dims)
        if renamed:
            self.report.count("dims-named", renamed)
        return ir.passes.PassResult(model, changed or bool(renamed))

    def _reshape(self, graph: ir.Graph, dims: DimSources, node: ir.Node) -> bool:
        out = dims.reshape_target(node)
        if out is None:
            reason = _why_kept(dims, node)
            y = node.outputs[0]
            if not y.uses() and not y.is_graph_output():
                note = (f"Reshape '{node.name}' is no longer used (only Shape read it, now answered from the inputs; "
                        f"dce removes it); its target is not rewritten: {reason}")
                self._candidates.append((False, f"[unused]   reshape-target at {node.name} (Reshape): no longer used "
                                                f"(dce removes it); {reason}"))
                self.report.notes.append(f"shape-reads: {note}")
                return False
            note = (f"the target of Reshape '{node.name}' is kept: {reason}; the Reshape computes its target at run "
                    f"time, with the same result")
            self._candidates.append((False, f"[no match] reshape-target at {node.name} (Reshape): kept, computed at "
                                            f"run time with the same result; {reason}"))
            self.report.notes.append(f"shape-reads: {note}")
            self._kept.append(types.SimpleNamespace(reason=reason))
            return False
        x, y = node.inputs[0], node.outputs[0]
        same = len(out) == len(x.shape) and all(v == 0 or dims.source(x, axis) == Const(v) for axis, v in enumerate(out))
        if same and not y.is_graph_output():
            ir.convenience.replace_all_uses_with(y, x)
            graph.remove(node, safe=True)
            self.report.count("identity-reshapes")
            self._candidates.append((True, f"[match]    reshape-target at {node.name} (Reshape): removed, its target "
                                           f"copies every dim of '{x.name}'"))
            return True
        target = _constant(graph, np.array(out, np.int64), self._names(f"shape_reads/{node.name or 'reshape'}/target"))
        node.replace_input_with(1, target)
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        if -1 not in out:
            y.shape = ir.Shape([x.shape[axis] if v == 0 else v for axis, v in enumerate(out)])
        self.report.count("reshape-targets")
        self._candidates.append((True, f"[match]    reshape-target at {node.name} (Reshape): the target of "
                                       f"'{x.name}' is the constant {out}"))
        return True

    def _shape(self, graph: ir.Graph, dims: DimSources, node: ir.Node) -> bool:
        x = node.inputs[0]
        if x.shape is None:
            return False
        rank = len(x.shape)
        axes = range(rank)[slice(_attr(node, "start", 0), _attr(node, "end", rank))]
        sources = [dims.source(x, axis) for axis in axes]
        if not sources or any(s is None for s in sources):
            return False
        pieces: list[ir.Value] = []
        run: list[InputDim] = []
        consts: list[int] = []

        def flush() -> None:
            if run:
                read = ir.node("Shape", [run[0].value], attributes={"start": run[0].axis, "end": run[-1].axis + 1},
                               name=self._names(f"shape_reads/{node.name or 'shape'}/of_{run[0].value.name}"))
                read.outputs[0].dtype, read.outputs[0].shape = ir.DataType.INT64, ir.Shape([len(run)])
                read.outputs[0].name = read.name
                graph.insert_before(node, read)
                pieces.append(read.outputs[0])
                run.clear()
            if consts:
                pieces.append(_constant(graph, np.array(consts, np.int64),
                                        self._names(f"shape_reads/{node.name or 'shape'}/dims")))
                consts.clear()

        for source in sources:
            if isinstance(source, Const):
                if run:
                    flush()
                consts.append(int(source))
            else:
                if consts or (run and (source.value is not run[-1].value or source.axis != run[-1].axis + 1)):
                    flush()
                run.append(source)
        flush()
        if len(pieces) == 1:
            new = pieces[0]
        else:
            concat = ir.node("Concat", pieces, attributes={"axis": 0},
                             name=self._names(f"shape_reads/{node.name or 'shape'}/concat"))
            concat.outputs[0].dtype, concat.outputs[0].shape = ir.DataType.INT64, ir.Shape([len(sources)])
            concat.outputs[0].name = concat.name
            graph.insert_before(node, concat)
            new = concat.outputs[0]
        old = node.outputs[0]
        if old.is_graph_output():
            return False
        ir.convenience.replace_all_uses_with(old, new)
        graph.remove(node, safe=True)
        self.report.count("shape-reads")
        return True

    @staticmethod
    def _name_dims(graph: ir.Graph, dims: DimSources) -> int:
        """Declared dims renamed after their proven source; the number of dims renamed."""
        renamed = 0
        for node in graph:
            for value in node.outputs:
                if value.shape is None or all(isinstance(d, int) for d in value.shape.dims):
                    continue
                new = []
                for axis, dim in enumerate(value.shape.dims):
                    source = dims.source(value, axis) if not isinstance(dim, int) else None
                    if isinstance(source, Const):
                        new.append(int(source))
                    elif isinstance(source, InputDim):
                        root = source.value.shape.dims[source.axis]
                        new.append(root if isinstance(root, int) or root.value is not None else dim)
                    else:
                        new.append(dim)
                if new != list(value.shape.dims):
                    renamed += sum(1 for a, b in zip(new, value.shape.dims, strict=True) if a != b)
                    value.shape = ir.Shape(new)
        return renamed

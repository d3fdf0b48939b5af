"""fp16 emulation: make onnxruntime on the CPU compute what an fp16 device would (verification only)."""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass as _IrShapeInferencePass
from qgraph_passes._library_logs import captured_warnings

from qgraph.pass_base import Pass

__all__ = ["ROUNDED_SUFFIX", "UNROUNDED_SUFFIX", "FP16EmulationPass"]

#: The value that carries the rounded tensor is named ``<name><ROUNDED_SUFFIX>``;
#: when the original is a graph output, the rounded value takes the output's
#: name and the unrounded one gets ``<name><UNROUNDED_SUFFIX>``.
ROUNDED_SUFFIX = ".fp16"
UNROUNDED_SUFFIX = ".fp32"
_PASS_KEY, _RULE_KEY = "qgraph.pass", "qgraph.rule"
_RULE = "round-through-fp16"


def _graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies), outer first."""
    yield from model.graphs()


def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for graph in _graphs(model):
        names.update(v.name for v in graph.inputs if v.name)
        names.update(graph.initializers)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


class FP16EmulationPass(Pass):
    """Round every float32 tensor through fp16 after each op, so onnxruntime shows fp16 results (verification only).

    A device compiler that converts a graph to fp16 stores every tensor in
    half precision: constants beyond ±65504 become ±inf, activations that
    leave the range overflow, and small values lose their low bits.
    onnxruntime on the CPU has no fp16 kernels for most ops, so this pass
    imitates the device instead: after every float32 value — each node
    output, graph input and initializer, in the main graph and in If/Loop/
    Scan bodies — it inserts ``Cast(to=float16)`` then ``Cast(to=float)``,
    and every reader (and the graph output) takes the rounded value. Run the
    result on its own or against the fp32 model to see NaN/inf or the size
    of the fp16 error before the device does.

    Never part of a deployment pipeline: the result is a slower fp32 graph
    whose only purpose is to be compared (``qgraph.verify.fp16``).

    What it does not emulate: arithmetic inside one op (a device may
    accumulate a reduction or a MatMul in fp16; onnxruntime accumulates in
    fp32 and only the result is rounded), and bodies of model-local
    functions (a function is a custom op the device implements as one
    kernel; its outputs are rounded). Value types come from the model, or
    from onnx shape inference when the exporter left them out (TorchScript
    exports); a value whose type stays unknown is not rounded and is
    counted in the notes. Casts this pass inserted are recognized, so
    running it twice changes nothing.
    """

    name = "fp16-emulate"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self._has_untyped_outputs(model):
            with captured_warnings("onnx_ir.passes.common.shape_inference"):
                _IrShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        taken = _all_names(model)
        rounded = untyped = 0
        for graph in list(_graphs(model)):
            for value in self._values_to_round(graph):
                if value.dtype is None:
                    untyped += 1
                elif value.dtype == ir.DataType.FLOAT:
                    self._round(graph, value, taken)
                    rounded += 1
        if rounded:
            self.report.count("tensors-rounded", rounded)
            self.report.notes.append(f"rounded {rounded} float32 tensor(s) through fp16")
        if untyped:
            self.report.notes.append(
                f"{untyped} value(s) of unknown type were not rounded (onnx shape inference "
                "could not type them)"
            )
        return ir.passes.PassResult(model, modified=rounded > 0)

    @staticmethod
    def _has_untyped_outputs(model: ir.Model) -> bool:
        return any(
            out.dtype is None
            for graph in _graphs(model)
            for node in graph
            for out in node.outputs
            if not _is_ours(node)
        )

    @staticmethod
    def _values_to_round(graph: ir.Graph) -> list[ir.Value]:
        values = list(graph.inputs) + [
            v for v in graph.initializers.values() if v not in graph.inputs
        ]
        for node in graph:
            if _is_ours(node):
                continue
            values.extend(
                out for out in node.outputs if out.name and not _already_rounded(out)
            )
        return [
            v for v in values
            if not _already_rounded(v) and (v.is_graph_output() or any(True for _ in v.uses()))
        ]

    def _round(self, graph: ir.Graph, value: ir.Value, taken: set[str]) -> None:
        base = value.name or "value"
        half = ir.node(
            "Cast", [value], attributes={"to": ir.DataType.FLOAT16},
            name=unique_name(f"{base}.to_fp16", taken),
        )
        back = ir.node(
            "Cast", half.outputs, attributes={"to": ir.DataType.FLOAT},
            name=unique_name(f"{base}.from_fp16", taken),
        )
        half.outputs[0].name = unique_name(f"{base}.half", taken)
        half.outputs[0].dtype = ir.DataType.FLOAT16
        half.outputs[0].shape = value.shape
        rounded = back.outputs[0]
        rounded.name = unique_name(f"{base}{ROUNDED_SUFFIX}", taken)
        rounded.dtype, rounded.shape = ir.DataType.FLOAT, value.shape
        for node in (half, back):
            node.metadata_props[_PASS_KEY] = self.name
            node.metadata_props[_RULE_KEY] = _RULE

        for use in list(value.uses()):
            if use.node is not half:
                use.node.replace_input_with(use.idx, rounded)
        producer = value.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, [half, back])
            if value.is_graph_output():
                take_output_name(graph, value, rounded, UNROUNDED_SUFFIX, taken)
        elif len(graph) > 0:
            graph.insert_before(next(iter(graph)), [half, back])
        else:
            graph.extend([half, back])


def _is_ours(node: ir.Node) -> bool:
    return node.metadata_props.get(_PASS_KEY) == FP16EmulationPass.name


def _already_rounded(value: ir.Value) -> bool:
    """True for a value whose only readers are this pass's first Cast (a second run)."""
    uses = list(value.uses())
    return bool(uses) and all(_is_ours(u.node) for u in uses)


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... the first not in ``taken`` (which it joins)."""
    candidate, i = name, 1
    while candidate in taken:
        candidate = f"{name}_{i}"
        i += 1
    taken.add(candidate)
    return candidate


def take_output_name(graph: ir.Graph, value: ir.Value, new: ir.Value, suffix: str, taken: set[str]) -> None:
    """``new`` replaces graph output ``value`` under its name (callers script against output names)."""
    name = value.name
    value.name = unique_name(f"{name}{suffix}", taken)
    new.name = name
    for i, output in enumerate(graph.outputs):
        if output is value:
            graph.outputs[i] = new

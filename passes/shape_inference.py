"""ONNX shape inference, delegated to onnx_ir (which keeps it cheap on big models)."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass as _IrShapeInferencePass
from qgraph_passes._library_logs import captured_warnings

from qgraph.errors import PassFailure
from qgraph.node_types import every_value_typed
from qgraph.pass_base import Option, Pass

__all__ = ["ShapeInferencePass"]

# onnx_ir reports a failed inference as a warning on this logger and leaves
# the model unchanged; the pass turns that into a note or an error.
_IR_LOGGER = "onnx_ir.passes.common.shape_inference"




def _failure_reason(record: logging.LogRecord) -> str:
    if record.exc_info and record.exc_info[1] is not None:
        return str(record.exc_info[1]).strip() or type(record.exc_info[1]).__name__
    return record.getMessage()


class ShapeInferencePass(Pass):
    """Fill in value types and shapes with onnx shape inference (big weights left out).

    Runs onnx_ir's ``ShapeInferencePass``: the model is serialized without
    initializers larger than 1 KB (they become typed inputs for the call, so
    external weights are not read and the proto stays small), passed to
    ``onnx.shape_inference.infer_shapes``, and the inferred dtype and shape of
    every value of the main graph and its subgraphs is merged back (an
    inferred shape replaces the stored one).

    ``data_prop`` propagates the values of small shape tensors
    (Shape -> Gather -> Concat -> Reshape), which makes dynamic-shape exports
    infer far more. Without ``strict`` inference is best effort: type checks
    are off and nodes onnx cannot infer are skipped while the rest is still
    inferred (an error onnx raises anyway is recorded as a note and the model
    is left unchanged); with ``strict`` types are checked and any inference
    error fails the pass with ``PassFailure``.

    Limits: values inside model-local functions are not annotated; custom-
    domain ops without a schema or function body get no output shape; the
    data propagated for large tensors is lost because they are stripped.
    """

    name = "shape-inference"
    options = {
        "data_prop": Option(
            bool,
            True,
            "propagate small constant shape tensors through shape arithmetic",
        ),
        "only_missing": Option(
            bool,
            False,
            "do nothing when every value of the main graph and its subgraphs "
            "already has a dtype and a shape (the presets end this way: on a "
            "typed graph onnx would only name the unknown dims)",
        ),
        "strict": Option(
            bool,
            False,
            "check types and fail on any inference error instead of skipping "
            "the nodes onnx cannot infer",
        ),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.config["only_missing"] and every_value_typed(model.graph):
            self.report.notes.append("every value already has a type and shape; inference not run")
            return ir.passes.PassResult(model, modified=False)
        ir_pass = _IrShapeInferencePass(
            check_type=self.config["strict"],
            strict_mode=self.config["strict"],
            data_prop=self.config["data_prop"],
        )
        with captured_warnings(_IR_LOGGER) as records:
            result = ir_pass(model)
        failures = [r for r in records if r.exc_info]
        if failures:
            reason = _failure_reason(failures[-1])
            if self.config["strict"]:
                raise PassFailure(
                    f"pass '{self.name}': onnx shape inference failed: {reason}",
                    pass_name=self.name,
                )
            self.report.notes.append(
                f"onnx shape inference failed, model left unchanged: {reason}"
            )
        self.report.notes.extend(r.getMessage() for r in records if not r.exc_info)
        if result.modified:
            self.report.notes.append("updated value types/shapes")
        return ir.passes.PassResult(model, modified=result.modified)

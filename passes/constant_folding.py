"""Constant folding, delegated to onnxscript's folder with weights kept on disk."""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer

from qgraph.graph_stats import all_nodes
from qgraph.node_types import every_value_typed
from qgraph.pass_base import Option, Pass

__all__ = ["ConstantFoldingPass"]

# onnxscript's own defaults (onnxscript.optimizer._constant_folding), restated
# here because they are qgraph options with their own documentation.
_INPUT_SIZE_LIMIT = 8192
_OUTPUT_SIZE_LIMIT = 512 * 512


class ConstantFoldingPass(Pass):
    """Fold nodes whose inputs are all constants into initializers (onnxscript's folder).

    Runs ``onnxscript.optimizer.fold_constants``: every node whose inputs are
    constants or initializers is evaluated with onnx's reference evaluator and
    replaced by an initializer (a ``Constant`` node inside functions); shape
    arithmetic on known dims (``Shape``, ``Size``, ``Gather`` of a shape,
    ``Concat`` of shapes) is folded by its partial evaluators, and ``Identity``
    consumers are forwarded to the Identity's input.

    Weights stay on disk: a node with any constant input of more than
    ``input_size_limit`` elements is never evaluated, so that input is never
    read. onnxscript makes one exception by default (a ``Transpose`` of a large
    initializer used only there is always folded, reading the whole tensor);
    this pass turns that exception off, because a lazily loaded external weight
    must not be pulled into memory by a cleanup pass.

    Limits (onnxscript's): nodes that read a graph input are not folded (the
    input may be overridden at run time, also when it has an initializer as
    default); control-flow ops, random ops, ``ConstantOfShape`` and
    (De)QuantizeLinear are kept; ops with several outputs are not folded; the
    folded-from names are recorded in each new value's metadata_props. The
    number of removed nodes is reported as ``nodes-folded``. Initializers the
    folded nodes read are dropped when nothing else reads them; Constant
    nodes left without users are ``dce``'s job.
    """

    name = "constant-folding"
    options = {
        "input_size_limit": Option(
            int,
            _INPUT_SIZE_LIMIT,
            "skip a node if any constant input has more elements than this "
            "(that input is then never read, so external weights stay on disk)",
        ),
        "output_size_limit": Option(
            int,
            _OUTPUT_SIZE_LIMIT,
            "do not store a folded result with more elements than this, unless it "
            "replaces single-use inputs at least as large",
        ),
        "shape_inference": Option(
            bool,
            True,
            "infer each node's output shape while folding (onnx node-level "
            "inference), so Shape/Size of statically known dims fold too; "
            "skipped when every value already has a type and shape",
        ),
    }

    def _should_fold(self, node: ir.Node) -> bool | None:
        limit = self.config["input_size_limit"]
        for value in node.inputs:
            if value is not None and value.const_value is not None and value.const_value.size > limit:
                return False
        return None  # onnxscript's default rules decide

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before = set(all_nodes(model))
        # Node-level inference costs ten times the folding itself on a typed
        # export (dynamo's, or any graph after shape-inference) and would only
        # re-derive the shapes the values carry already.
        infer = self.config["shape_inference"] and not every_value_typed(model.graph)
        result = onnxscript.optimizer.fold_constants(
            model,
            onnx_shape_inference=infer,
            input_size_limit=self.config["input_size_limit"],
            output_size_limit=self.config["output_size_limit"],
            should_fold=self._should_fold,
        )
        removed = len(nodes_before - set(all_nodes(model)))
        if removed:
            self.report.count("nodes-folded", removed)
            self.report.notes.append(f"folded {removed} node(s) into constants")
        return ir.passes.PassResult(model, modified=bool(result.modified))

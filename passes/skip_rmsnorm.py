"""Residual add + RMSNormalization -> ``com.microsoft::SkipSimplifiedLayerNormalization`` (the ``ort`` target).

A pre-norm decoder adds each block's output to the residual stream and
normalizes the sum for the next block; the sum itself flows on as the new
residual::

    s = a + b
    y = RMSNormalization(s, w)        -> y, _, _, s = SkipSimplifiedLayerNormalization(a, b, w)

onnxruntime runs the fused op in one pass over the row (the sum is written
once and read once), where the two ops read and write the row twice. ONNX
has no standard op for it, so the canonical form stays ``Add`` +
``RMSNormalization`` and this is a lowering for onnxruntime only.

The kernel's contract, checked before rewriting: float32 (also float16),
normalization over the last axis in float32 (``stash_type`` 1), a 1-D weight
of the last dim's length, and both addends of one shape (the kernel
broadcasts only a skip of ``[S, H]``; a broadcasting add is kept). Every
RMSNormalization of a sum left unlowered is named in the report notes with
the check that failed.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph import RewritePass, Rule, RuleSet
from qgraph.rewrite import explain

__all__ = ["SkipRMSNormPass", "RULES"]

MICROSOFT_DOMAIN = "com.microsoft"
_KERNEL_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def add_then_rms_norm(op, a, b, scale):
    total = op.Add(a, b)
    normalized = op.RMSNormalization(total, scale, epsilon=op.capture("epsilon"), axis=op.capture("axis"),
                                     stash_type=op.capture("stash_type"))
    return normalized, total


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    for x, y in zip(a.shape.dims, b.shape.dims):
        if isinstance(x, int) or isinstance(y, int):
            if x != y:
                return False
        elif x.value is None or x.value != y.value:
            return False
    return True


def kernel_contract(a, b, scale, axis, stash_type) -> str | None:
    """What onnxruntime's SkipSimplifiedLayerNormalization kernel computes without broadcasting."""
    if a.dtype not in _KERNEL_DTYPES or b.dtype != a.dtype or scale.dtype != a.dtype:
        return f"the addends are {a.dtype} and {b.dtype}, the weight {scale.dtype}: the kernel takes one of float32/float16"
    if stash_type != int(ir.DataType.FLOAT):
        return f"stash_type is {ir.DataType(stash_type)}, the kernel normalizes in float32"
    if not _same_shape(a, b):
        return f"the addends' shapes {a.shape} and {b.shape} are not known to be equal (the kernel does not broadcast them)"
    if len(a.shape) not in (2, 3):
        return f"the sum is {len(a.shape)}-D; the kernel takes [B, S, H] or [T, H]"
    if axis not in (-1, len(a.shape) - 1):
        return f"it normalizes from axis {axis} on, not over the last axis only"
    if scale.shape is None or len(scale.shape) != 1 or scale.shape[0] != a.shape[-1]:
        return f"the weight has shape {scale.shape}, not [{a.shape[-1]}]"
    return None


def to_skip_simplified_layer_norm(op, a, b, scale, epsilon):
    outputs = op.SkipSimplifiedLayerNormalization(a, b, scale, epsilon=float(epsilon), _domain=MICROSOFT_DOMAIN,
                                                  _outputs=4)
    # mean and inv_std_var are unused; typed all the same, so no later pass has to infer them.
    stats_shape = ir.Shape([*a.shape.dims[:-1], 1])
    for unused in outputs[1:3]:
        unused.type, unused.shape = ir.TensorType(ir.DataType.FLOAT), stats_shape
    return outputs[0], outputs[3]


_SHAPES = {"a": (ir.DataType.FLOAT, ("B", "S", "H")), "b": (ir.DataType.FLOAT, ("B", "S", "H")),
           "scale": (ir.DataType.FLOAT, ("H",))}
RULES = RuleSet(
    [
        Rule("skip-rmsnorm", add_then_rms_norm, to_skip_simplified_layer_norm, kernel_contract, commute=True,
             opsets={MICROSOFT_DOMAIN: 1},
             doc="(RMSNormalization(a + b, w), a + b) -> com.microsoft::SkipSimplifiedLayerNormalization(a, b, w)",
             example_inputs=_SHAPES, example_values={"epsilon": 1e-5, "axis": -1, "stash_type": 1}),
    ],
    name="skip-rmsnorm",
)


def _normalizes_a_sum(node: ir.Node) -> bool:
    if node.op_type != "RMSNormalization" or not node.inputs or node.inputs[0] is None:
        return False
    producer = node.inputs[0].producer()
    return producer is not None and producer.op_type == "Add"


class SkipRMSNormPass(RewritePass):
    """Lower residual Add + RMSNormalization to com.microsoft::SkipSimplifiedLayerNormalization (onnxruntime).

    The rule table is ``RULES``; the module docstring gives the kernel's
    contract. An RMSNormalization of an Add that stays is named in the report
    notes with the reason.
    """

    name = "skip-rmsnorm"
    near_miss_notes = False  # every refused candidate gets its own note below
    rules = RULES

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if not any(_normalizes_a_sum(node) for node in ir.traversal.RecursiveGraphIterator(model.graph)):
            return result  # every candidate was lowered: skip the second sweep
        for cand in explain(model, self.rule_set()):
            if not cand.matched and cand.nodes_matched > 1:
                where = f"{cand.graph}/{cand.node}" if cand.graph else cand.node
                self.report.notes.append(f"RMSNormalization of a sum '{where}' kept: {cand.reason}")
        return result

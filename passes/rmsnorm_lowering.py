"""Lower the canonical RMSNormalization to what a target's compiler takes.

* ``custom-rmsnorm`` (the qaic preset): ``com.qti.aisw.onnx::CustomRMSNorm(x, weight)``
  with a float ``epsilon``, the op Cloud AI 100's compiler knows
  (docs/design.md, "Custom ops"); its function body rides along so onnxruntime
  still runs the model, and survives the preset's later move to opset 17.
* ``simplified-layer-norm``: ``com.microsoft::SimplifiedLayerNormalization``,
  the name onnxruntime's transformer tools use, also with a function body
  (onnxruntime itself registers that kernel only in the ONNX domain).
* ``primitive``: back to Mul / ReduceMean / Add / Sqrt / Div (and the Casts
  of ``stash_type``), for a compiler with neither op.

Both named ops normalize over the last axis in float32 with a 1-D weight of
that axis's length; an RMSNormalization that is anything else (another dtype
or stash_type, several trailing axes, a scale of another shape) is kept, and
the report says which node and why. The ``ort`` preset does not run this
pass: onnxruntime runs RMSNormalization natively.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.rmsnorm_functions import (
    CUSTOM_RMSNORM_DOMAIN,
    MICROSOFT_DOMAIN,
    custom_rms_norm,
    simplified_layer_norm,
)
from qgraph_passes.shape_values import static_dim

from qgraph import RewritePass, Rule, RuleSet
from qgraph.pass_base import Option
from qgraph.rewrite import explain

__all__ = ["LowerRMSNormPass", "RULES"]


def rms_normalization(op, x, scale):
    return op.RMSNormalization(
        x, scale, epsilon=op.capture("epsilon"), axis=op.capture("axis"), stash_type=op.capture("stash_type")
    )


def _dims_equal(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def float32_last_axis(x, scale, axis, stash_type) -> str | None:
    """The device ops' contract: float32, last axis, a 1-D weight of the last dim's length."""
    if x.dtype != ir.DataType.FLOAT or scale.dtype != ir.DataType.FLOAT:
        return f"x is {x.dtype} and the scale {scale.dtype}; the op is lowered for float32 only"
    if stash_type != int(ir.DataType.FLOAT):
        return f"stash_type is {ir.DataType(stash_type)}, not float32"
    if x.shape is None or scale.shape is None:
        return "the shapes of x and the scale are not both known"
    if axis not in (-1, len(x.shape) - 1):
        return f"it normalizes from axis {axis} on, not over the last axis only"
    last = x.shape[-1]
    if not isinstance(last, int):  # TorchScript leaves a per-head norm's x symbolic (Qwen3's q/k norm): its head size
        last = static_dim(x, -1) or last  # is written in the graph's heads reshape
    if len(scale.shape) != 1 or not _dims_equal(scale.shape[0], last):
        return f"the weight has shape {scale.shape}, not [{last}] (x's last dim)"
    return None


def known_axes(match, x, axis, stash_type) -> str | None:
    """Primitive ops need the axes as a list and x's dtype for the Casts."""
    if x.dtype is None:
        return f"dtype of '{x.name}' is unknown"
    if axis >= 0 and x.shape is None:
        return f"axis {axis} is non-negative and the rank of '{x.name}' is unknown"
    match["axes"] = list(range(axis, 0)) if axis < 0 else list(range(axis, len(x.shape)))
    match["compute"] = ir.DataType(stash_type)
    return None


def to_custom_rms_norm(op, x, scale, epsilon):
    return op.CustomRMSNorm(x, scale, epsilon=float(epsilon), _domain=CUSTOM_RMSNORM_DOMAIN)


def to_simplified_layer_norm(op, x, scale, epsilon, axis, stash_type):
    return op.SimplifiedLayerNormalization(
        x, scale, epsilon=float(epsilon), axis=axis, stash_type=stash_type, _domain=MICROSOFT_DOMAIN
    )


def to_primitive(op, x, scale, epsilon, axes, compute):
    # RMSNormalization's definition: normalize in stash_type, cast back to x's dtype, then scale.
    x_c = x if x.dtype == compute else op.Cast(x, to=int(compute))
    mean_sq = op.ReduceMean(op.Mul(x_c, x_c), op.const(np.array(axes, dtype=np.int64)), keepdims=1)
    rms = op.Sqrt(op.Add(mean_sq, op.const(epsilon, dtype=compute)))  # dtype given: a float64 stays float64
    normalized = op.Div(x_c, rms)
    if x.dtype != compute:
        normalized = op.Cast(normalized, to=int(x.dtype))
    return op.Mul(normalized, scale)


_EXAMPLES = {"epsilon": 1e-5, "axis": -1, "stash_type": 1}
_SHAPES = {"x": (ir.DataType.FLOAT, ("B", "S", "H")), "scale": (ir.DataType.FLOAT, ("H",))}

RULES = {
    "custom-rmsnorm": Rule(
        "rmsnorm-to-custom-rmsnorm",
        rms_normalization,
        to_custom_rms_norm,
        float32_last_axis,
        functions=(custom_rms_norm,),
        doc="RMSNormalization(x, w) -> com.qti.aisw.onnx::CustomRMSNorm(x, w)",
        example_inputs=_SHAPES,
        example_values=_EXAMPLES,
    ),
    "simplified-layer-norm": Rule(
        "rmsnorm-to-simplified-layer-norm",
        rms_normalization,
        to_simplified_layer_norm,
        float32_last_axis,
        functions=(simplified_layer_norm,),
        doc="RMSNormalization(x, w) -> com.microsoft::SimplifiedLayerNormalization(x, w)",
        example_inputs=_SHAPES,
        example_values=_EXAMPLES,
    ),
    "primitive": Rule(
        "rmsnorm-to-primitive",
        rms_normalization,
        to_primitive,
        known_axes,
        doc="RMSNormalization(x, w) -> w * x / sqrt(ReduceMean(x * x) + eps)",
        example_inputs=_SHAPES,
        example_values=_EXAMPLES,
    ),
}


class LowerRMSNormPass(RewritePass):
    """Lower RMSNormalization to CustomRMSNorm (qaic), SimplifiedLayerNormalization, or primitive ops.

    Option ``to`` picks the target form (see the module docstring). Every
    RMSNormalization the chosen form cannot express is kept and named in the
    report notes with the reason.
    """

    name = "lower-rmsnorm"
    near_miss_notes = False  # every candidate left unfused gets its own note below
    options = {
        "to": Option(
            str,
            "custom-rmsnorm",
            "what RMSNormalization becomes: com.qti.aisw.onnx::CustomRMSNorm, "
            "com.microsoft::SimplifiedLayerNormalization, or primitive ops",
            choices=tuple(RULES),
        ),
    }

    def rule_set(self) -> RuleSet:
        return RuleSet([RULES[self.config["to"]]], name=self.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        for cand in explain(model, self.rule_set()):
            if not cand.matched:
                where = f"{cand.graph}/{cand.node}" if cand.graph else cand.node
                self.report.notes.append(f"RMSNormalization '{where}' kept ({self.config['to']}): {cand.reason}")
        return result

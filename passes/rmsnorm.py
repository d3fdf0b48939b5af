"""RMSNorm fusion: every exporter's spelling of RMSNorm becomes one ``RMSNormalization`` (opset 23).

What the rules recognize (docs/design.md, "canonicalize")::

    x_up   = Cast(x, to=C)?                                  # x.float(), or absent
    ms     = ReduceMean(Pow(x_up, 2) | Mul(x_up, x_up), axes=trailing, keepdims=1)
    rms    = Sqrt(ms + eps)
    norm   = x_up * (Reciprocal(rms) | Div(1, rms) | Pow(ms + eps, -0.5))  |  x_up / rms
    y      = scale * Cast(norm, to=T)?                       # Llama: weight * h.to(input_dtype)
    y      = norm * (1 + w)  [w constant: the +1 is folded]  # Gemma

Commutative operands are matched in both orders. The replacement computes
what the original computed: ``stash_type`` is the dtype the mean of squares
ran in (C), so a float16 model that casts up to float32 keeps its float32
accumulation; a Cast back to x's dtype before the scale is what
RMSNormalization does by definition, and a scale applied in C to an upcast x
(Gemma) becomes ``RMSNormalization(Cast(x, C), scale)``.

Not fused, and reported in the pass notes (which node, which check failed):
a reduction over a non-trailing axis, an epsilon that is not a scalar
constant, an intermediate used outside the subgraph, a scale that would
broadcast x to a larger shape, a computation in a narrower type than x, a
Cast back to a dtype other than x's.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.opset_upgrade import opset_at_least
from qgraph_passes.shape_values import static_dim
from qgraph_passes.rmsnorm_report import unfused_notes

from qgraph import RewritePass, Rule, RuleSet
from qgraph.pass_base import Prerequisite

__all__ = ["RMSNormFusionPass", "RULES"]

_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_WIDE = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


# -- patterns ------------------------------------------------------------------


def _normalized(op, x, axes, eps):
    """x / sqrt(mean(x^2) + eps), optionally computed on Cast(x, C).

    ``axes`` and ``eps`` are variables, not constant patterns, so that a
    non-constant one is rejected by the condition with a precise reason.
    """
    x_up = op.optional(op.Cast(x, to=op.capture("compute_to")))
    square = op.Pow(x_up, 2.0) | op.Mul(x_up, x_up)
    mean_sq = op.ReduceMean(square, axes, keepdims=1)
    var_eps = op.Add(mean_sq, eps, _commute=True)
    rms = op.Sqrt(var_eps)
    inv_rms = op.Reciprocal(rms) | op.Div(1.0, rms) | op.Pow(var_eps, -0.5)
    return op.Mul(x_up, inv_rms, _commute=True) | op.Div(x_up, rms)


def rms_norm(op, x, scale, axes, eps):
    normalized = op.optional(op.Cast(_normalized(op, x, axes, eps), to=op.capture("out_to")))
    return op.Mul(scale, normalized, _commute=True)


def rms_norm_one_plus_weight(op, x, w, axes, eps):
    one_plus_w = op.Add(op.optional(op.Cast(w, to=op.capture("scale_to"))), 1.0, _commute=True)
    return op.Mul(_normalized(op, x, axes, eps), one_plus_w, _commute=True)


# -- conditions ----------------------------------------------------------------


def _dims_equal(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _scale_reason(scale_shape: ir.Shape | None, x: ir.Value) -> str | None:
    """Why RMSNormalization could not take this scale (it must broadcast to x one way), if it could not."""
    x_shape = x.shape
    if scale_shape is None or x_shape is None:
        return "the shapes of x and the scale are not both known (run shape-inference)"
    if len(scale_shape) > len(x_shape):
        return f"the scale (rank {len(scale_shape)}) would broadcast x (rank {len(x_shape)}) to a higher rank"
    for k, (s, d) in enumerate(zip(reversed(scale_shape.dims), reversed(x_shape.dims)), start=1):
        # static_dim: TorchScript's per-head norm (Qwen3's q/k norm) reads a head split whose size 16 is
        # written in its Reshape target, while the stored shape leaves it symbolic
        if s != 1 and not _dims_equal(s, d) and not (isinstance(s, int) and static_dim(x, -k) == s):
            return f"the scale's dim {s} is not x's dim {d}: x would be broadcast"
    return None


def _small_constant(value: ir.Value, what: str, limit: int = 64) -> np.ndarray | str:
    """The contents of a small constant, or why it is not one (a weight-sized one is not read)."""
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return f"{what} '{value.name}' is not a constant"
    if tensor.size > limit:
        return f"{what} '{value.name}' has {tensor.size} elements"
    return tensor.numpy()


def _trailing_axis(axes: np.ndarray, rank: int | None) -> int | str:
    """The first of the trailing axes the mean runs over (negative), or why they are not trailing."""
    values = [int(a) for a in np.asarray(axes).reshape(-1)]
    if not values:
        return "ReduceMean has empty axes"
    if any(a >= 0 for a in values):
        if rank is None:
            return f"ReduceMean axes {values} are non-negative and the rank of x is unknown"
        values = [a - rank if a >= 0 else a for a in values]
    k = len(values)
    if sorted(values) != list(range(-k, 0)):
        return f"ReduceMean runs over axes {values}, not the last axis (or last axes)"
    return -k


def _common_checks(match, x, axes, eps, compute_to) -> str | None:
    """Epsilon, axes and the computation dtype; stores epsilon, axis and stash_type on the match."""
    x_type = x.dtype
    if x_type is None:
        return f"dtype of '{x.name}' is unknown (run shape-inference)"
    if x_type not in _FLOATS:
        return f"'{x.name}' is {x_type}, not a floating-point tensor"
    rank = len(x.shape) if x.shape is not None else None
    axes = _small_constant(axes, "the ReduceMean axes")
    if isinstance(axes, str):
        return axes
    axis = _trailing_axis(axes, rank)
    if isinstance(axis, str):
        return axis
    eps_name = eps.name
    eps = _small_constant(eps, "epsilon")
    if isinstance(eps, str):
        return eps
    if eps.size != 1:
        return f"epsilon '{eps_name}' has {eps.size} elements, not one"
    if eps.ndim > (rank if rank is not None else 1):
        return f"epsilon of rank {eps.ndim} would broadcast the result to a higher rank"
    compute = ir.DataType(compute_to) if compute_to is not None else x_type
    if compute not in _FLOATS:
        return f"the mean of squares is computed in {compute}, not a floating-point type"
    if compute != x_type and compute not in _WIDE:
        return f"the mean of squares is computed in {compute}, narrower than x ({x_type})"
    match["epsilon"] = float(np.asarray(eps, dtype=np.float64).reshape(-1)[0])
    match["axis"] = axis
    match["stash_type"] = int(compute)
    match["compute"] = compute
    return None


def canonical_rms_norm(match, x, scale, axes, eps, compute_to=None, out_to=None):
    """Llama-style: scale * Cast(norm, to=T)?."""
    if (reason := _common_checks(match, x, axes, eps, compute_to)) is not None:
        return reason
    compute = match["compute"]
    out = ir.DataType(out_to) if out_to is not None else compute
    if out == x.dtype:
        match["x_to"] = None  # RMSNormalization casts its result back to x's dtype by definition
    elif out_to is None:
        match["x_to"] = int(compute)  # the scale is applied in C (Gemma's x.float())
    else:
        return f"the result is cast to {out}, which is neither x's dtype ({x.dtype}) nor the compute dtype"
    return _scale_reason(scale.shape, x)


def canonical_one_plus_weight(match, x, w, axes, eps, compute_to=None, scale_to=None):
    """Gemma-style: norm * (1 + w), with w a constant the +1 is folded into."""
    if (reason := _common_checks(match, x, axes, eps, compute_to)) is not None:
        return reason
    tensor = ir.convenience.get_const_tensor(w)
    if tensor is None:
        return f"the weight '{w.name}' of (1 + w) is not a constant"
    compute = match["compute"]
    weight = tensor.numpy()
    if scale_to is not None:
        weight = weight.astype(ir.DataType(scale_to).numpy())
    if weight.dtype != compute.numpy():
        return f"(1 + w) is {weight.dtype}, the normalized value {compute}"
    match["x_to"] = None if compute == x.dtype else int(compute)
    match["folded_scale"] = ir.tensor(weight + np.ones((), dtype=weight.dtype))
    match["folded_name"] = f"{w.name}_plus_one"
    return _scale_reason(ir.Shape(weight.shape), x)


# -- replacements --------------------------------------------------------------


def to_rms_normalization(op, x, scale, epsilon, axis, stash_type, x_to):
    x_in = x if x_to is None else op.Cast(x, to=x_to)
    return op.RMSNormalization(x_in, scale, epsilon=epsilon, axis=axis, stash_type=stash_type)


def to_rms_normalization_folded(op, x, folded_scale, folded_name, epsilon, axis, stash_type, x_to):
    scale = op.const(folded_scale, name=folded_name)
    return to_rms_normalization(op, x, scale, epsilon, axis, stash_type, x_to)


_EXAMPLES = {"axes": np.array([-1], dtype=np.int64), "eps": np.float32(1e-5), "compute_to": 1, "out_to": 1, "scale_to": 1}

RULES = RuleSet(
    [
        Rule(
            "rmsnorm-one-plus-weight",
            rms_norm_one_plus_weight,
            to_rms_normalization_folded,
            canonical_one_plus_weight,
            opsets={"": 23},
            doc="x / sqrt(mean(x^2) + eps) * (1 + w) -> RMSNormalization(x, 1 + w)",
            example_inputs={"x": (ir.DataType.FLOAT, ("B", "S", 8))},
            example_values={**_EXAMPLES, "w": np.linspace(-0.5, 0.5, 8, dtype=np.float32)},
        ),
        Rule(
            "rmsnorm",
            rms_norm,
            to_rms_normalization,
            canonical_rms_norm,
            opsets={"": 23},
            doc="scale * (x / sqrt(mean(x^2) + eps)) -> RMSNormalization(x, scale)",
            example_inputs={"x": (ir.DataType.FLOAT, ("B", "S", "H")), "scale": (ir.DataType.FLOAT, ("H",))},
            example_values=_EXAMPLES,
        ),
    ],
    name="rmsnorm",
)


def _candidate_inputs_typed(model: ir.Model) -> bool:
    """Whether the values the rules read dtypes from (x, before and after a Cast) are typed."""
    for node in model.graph:
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        square = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if square is None or square.op_type not in ("Pow", "Mul") or square.inputs[0] is None:
            continue
        x = square.inputs[0]
        if x.dtype is None:
            return False
        cast = x.producer()
        if cast is not None and cast.op_type == "Cast" and cast.inputs[0] is not None and cast.inputs[0].dtype is None:
            return False
    return True


class RMSNormFusionPass(RewritePass):
    """Fuse RMSNorm subgraphs (every exporter's form, Gemma's 1 + w, q/k norms) into RMSNormalization.

    The rule table is ``RULES``; see the module docstring for the shapes it
    recognizes. RMSNormalization is an opset-23 op, so the pass requires the
    default-domain opset >= 23 (the manager runs ``opset-upgrade`` first on
    a raw export), and it reads dtypes to pick ``stash_type``, so the values
    it looks at must be typed (a raw TorchScript export has no value types:
    the manager runs ``shape-inference`` first). Mean-of-squares subgraphs
    that stay unfused are listed in the report notes with the check that
    failed.
    """

    name = "rmsnorm"
    near_miss_notes = False  # every candidate left unfused gets its own note below
    rules = RULES
    prerequisites = (
        opset_at_least(23),
        Prerequisite(
            description="dtypes of the values RMSNorm candidates read",
            check=_candidate_inputs_typed,
            satisfied_by="shape-inference",
        ),
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        self.report.notes.extend(unfused_notes(model, self.rule_set()))
        return result

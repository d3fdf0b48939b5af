"""Checking a model the way an fp16 device will run it.

The default equivalence check compares two fp32 graphs in fp32. That is the
wrong question for a pass that prepares a graph for fp16 conversion
(``fp16-clip``): clipping the dynamo exporter's -3.4e38 mask fill to -65504
changes fp32 results in rows where every key is masked (in fp32, -3.4e38
swallows the attention score added to it, -65504 does not), yet on the
device — where -65504 swallows the score just as well — the clipped graph
computes what the fp32 original computes, while the unclipped one turns the
fill into -inf. The question that matters is: *run as an fp16 device runs
it, does the candidate compute what the fp32 reference computes?*

* :func:`emulate_fp16` — a copy of a model that rounds every float32 tensor
  through fp16 after each op (the registered ``fp16-emulate`` pass), so
  onnxruntime on the CPU shows NaN/inf and fp16 error;
* :func:`check_fp16` — property-based check of the fp32 reference against
  the emulated candidate, with fp16 tolerances on float outputs;
* :func:`fp16_step_verifier` — the same as a ``verify(before, after,
  pass_name)`` callable, the shape the pass manager takes for ``--verify``;
* :func:`compare_fp16` — compare fp32 outputs with outputs of an fp16 (or
  emulated) run: float16 outputs are widened, and a value saturated at
  ±65504 agrees with a reference at or beyond it with the same sign (±inf
  included), the way clipping is meant to behave.

The default checker (:func:`qgraph.verify.check_equivalent`) is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qgraph import io as qio
from qgraph.errors import PassFailure
from qgraph.verify.compare import (
    ComparisonReport,
    Tolerance,
    compare_arrays,
    default_tolerance,
)
from qgraph.verify.equivalence import (
    EquivalenceResult,
    NotEquivalentError,
    check_equivalent,
)

__all__ = [
    "FP16_MAX",
    "FP16_TOLERANCE",
    "check_fp16",
    "compare_fp16",
    "emulate_fp16",
    "fp16_step_verifier",
    "saturated",
]

FP16_MAX = float(np.finfo(np.float16).max)
#: An fp16 result is judged against fp32 with the fp16 output tolerance.
FP16_TOLERANCE: Tolerance = default_tolerance(np.float16)
EMULATION_PASS = "fp16-emulate"


def emulate_fp16(model: qio.ModelSource) -> ir.Model:
    """A copy of ``model`` that rounds every float32 tensor through fp16 (weights shared, not copied)."""
    from qgraph.registry import (
        default_registry,  # the framework finds passes by name only
    )

    emulated = qio.load(model).clone()
    default_registry().create(EMULATION_PASS)(emulated)
    return emulated


def saturated(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Where ``candidate`` holds ±65504 and ``reference`` is at or beyond it with the same sign."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (np.abs(cand) == FP16_MAX) & (np.abs(ref) >= FP16_MAX) & (np.sign(ref) == np.sign(cand))


def compare_fp16(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    names: Iterable[str] | None = None,
    *,
    tolerance: Tolerance = FP16_TOLERANCE,
) -> ComparisonReport:
    """Compare fp32 reference outputs with fp16 (or fp16-emulated) outputs, by name.

    A float16 candidate output is widened to float32 first (the dtype
    change is the point of fp16 conversion, not a mismatch); saturation at
    ±65504 agrees with the reference (see :func:`saturated`); float outputs
    use ``tolerance``, others are exact.
    """
    reports = []
    for name in names if names is not None else reference:
        ref, cand = np.asarray(reference[name]), np.asarray(candidate[name])
        tol = None
        if ref.dtype == np.float32 and cand.dtype in (np.float16, np.float32):
            cand = cand.astype(np.float32)
            cand = np.where(saturated(ref, cand), ref, cand)
            tol = tolerance
        reports.append(compare_arrays(name, ref, cand, tol))
    return ComparisonReport(reports)


def _float_outputs(model: ir.Model) -> list[str]:
    return [
        v.name for v in model.graph.outputs
        if v.name and (v.dtype is None or v.dtype.is_floating_point())
    ]


def check_fp16(
    reference: qio.ModelSource,
    candidate: qio.ModelSource | None = None,
    *,
    examples: int = 10,
    seed: int | None = 0,
    tolerance: Tolerance = FP16_TOLERANCE,
    **kwargs: Any,
) -> EquivalenceResult:
    """Does ``candidate`` (default: ``reference`` itself), run as an fp16 device runs it, compute what ``reference`` computes in fp32?

    Inputs are drawn as :func:`qgraph.verify.check_equivalent` draws them
    (other keyword arguments go there: ``options``, ``strategies``, ...).
    Localization is off: every tensor of an emulated graph differs from fp32
    by rounding, so "the first diverging tensor" would name the first node.
    """
    ref_model = qio.load(reference)
    emulated = emulate_fp16(ref_model if candidate is None else candidate)
    tolerances = {name: tolerance for name in _float_outputs(ref_model)}
    tolerances.update(kwargs.pop("tolerances", None) or {})
    kwargs.pop("localize_divergence", None)
    # Every row counts here: an fp16 overflow at a padding query (a NaN
    # from a mask fill) reaches the valid rows of a deeper graph through
    # that position's keys and values (0 * NaN), so it is not "undefined".
    kwargs.setdefault("compare_padding_queries", True)
    kwargs.setdefault("candidate_label", "the candidate emulated in fp16")
    kwargs.setdefault("reference_label", "the fp32 reference")
    return check_equivalent(
        ref_model, emulated, examples=examples, seed=seed, tolerances=tolerances,
        localize_divergence=False, **kwargs,
    )


def fp16_step_verifier(
    *, examples: int = 10, seed: int | None = 0, **kwargs: Any
) -> Callable[[ir.Model, ir.Model, str], None]:
    """``verify(before, after, pass_name)``: the pass's output, emulated in fp16, against its fp32 input.

    For passes whose purpose is fp16 deployment (``fp16-clip``); raises
    :class:`qgraph.verify.NotEquivalentError` naming the pass.
    """

    def verify(before: ir.Model, after: ir.Model, pass_name: str, meaning: str = "fp16", budget: Any = None) -> None:
        # Every step is checked as an fp16 device would run it; a step whose
        # meaning is sequence replay (kv-cache) has no fp16 form of that check.
        if meaning not in ("fp16", "outputs"):
            raise PassFailure(
                f"pass '{pass_name}' declares meaning {meaning!r}; the fp16 verifier checks outputs only",
                pass_name=pass_name,
            )
        result = check_fp16(
            before, after, examples=examples, seed=seed, pass_name=pass_name,
            reference_label=f"the model before pass {pass_name!r} (fp32)",
            candidate_label=f"the model after pass {pass_name!r} (emulated in fp16)",
            **kwargs,
        )
        if not result.equivalent:
            raise NotEquivalentError(result)

    return verify

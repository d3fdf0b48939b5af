"""Compare the outputs of two graphs the way Polygraphy reports a comparison.

Each output gets max/mean absolute error, max relative error, where the
largest error sits, the smallest ``atol`` (at the configured ``rtol``) that
would have passed, and PASSED/FAILED. The pass criterion is elementwise, as
in ``numpy.isclose``: ``|candidate - reference| <= atol + rtol * |reference|``.

Tolerance policy (the decision, written down):

* The tolerance depends on the dtype: fp64 1e-7, fp32 1e-4, fp16 1e-2,
  bf16 4e-2, fp8 0.25 (atol and rtol alike); integers and bools are exact.
* ``atol`` is scaled by the output's magnitude, ``max(1, max|reference|)``.
  A rewrite that reorders a reduction (fusing ops, Gemm vs MatMul+Add)
  changes the rounding of *large* partial sums, and an output element that
  ends up near zero by cancellation then carries an absolute error
  proportional to the magnitude of the sums, not to its own. Scaling by the
  output's range keeps fp32 checks meaningful for inputs drawn across
  magnitudes without letting real bugs (which move values by far more than
  a few ulps of the range) through. Set ``scale_atol=False`` for a fixed atol.
* A NaN or Inf in the candidate where the reference is finite fails, and so
  does a finite candidate where the reference is NaN/Inf; NaN against NaN
  and Inf against an Inf of the same sign agree.
* A shape or dtype difference fails with a message saying which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "ComparisonReport",
    "OutputReport",
    "Tolerance",
    "compare_arrays",
    "compare_outputs",
    "default_tolerance",
    "elementwise_tolerances",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Elementwise tolerance: ``|b - a| <= atol * scale + rtol * |a|``.

    ``scale`` is ``max(atol_floor, max|a|)`` when ``scale_atol`` is set, else
    1. Outputs use ``atol_floor=1`` (an absolute error below ``atol`` is
    fine however small the output); the localizer uses 0, so a tensor is
    judged against its own range (an epsilon change moves a 1e-3-sized
    mean-square by far more than its rounding, yet by less than 1e-4).
    """

    atol: float
    rtol: float
    scale_atol: bool = True
    atol_floor: float = 1.0

    def relative_to_range(self) -> Tolerance:
        """The same tolerance with atol scaled by the tensor's own range, without a floor."""
        return dataclasses.replace(self, atol_floor=0.0) if self.scale_atol else self

    @property
    def exact(self) -> bool:
        return self.atol == 0.0 and self.rtol == 0.0


EXACT = Tolerance(0.0, 0.0, scale_atol=False)

_FLOAT_TOLERANCES: dict[np.dtype, Tolerance] = {
    np.dtype(np.float64): Tolerance(1e-7, 1e-7),
    np.dtype(np.float32): Tolerance(1e-4, 1e-4),
    np.dtype(np.float16): Tolerance(1e-2, 1e-2),
    np.dtype(ml_dtypes.bfloat16): Tolerance(4e-2, 4e-2),
}
_FP8_TOLERANCE = Tolerance(0.25, 0.25)


def _is_float(dtype: np.dtype) -> bool:
    """True for numpy floats and the ml_dtypes floats (bf16, fp8, ...)."""
    if np.issubdtype(dtype, np.floating):
        return True
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def elementwise_tolerances(model: Any) -> dict[str, Tolerance]:
    """Each float output of ``model`` (an ``ir.Model``) judged element by element.

    The default tolerance scales atol by the output's largest magnitude,
    which suits whole models; for a small graph checked on inputs spread over
    many decades (the rule self-check) a large element elsewhere would hide a
    difference among small ones.
    """
    tolerances = {}
    for out in model.graph.outputs:
        if out.dtype is not None and out.dtype.is_floating_point():
            tolerances[out.name] = dataclasses.replace(default_tolerance(out.dtype.numpy()), scale_atol=False)
    return tolerances


def default_tolerance(dtype: np.dtype | type) -> Tolerance:
    """The tolerance used for an output of this dtype unless overridden."""
    dtype = np.dtype(dtype)
    if dtype in _FLOAT_TOLERANCES:
        return _FLOAT_TOLERANCES[dtype]
    if _is_float(dtype):
        return _FP8_TOLERANCE
    return EXACT


def _json_float(x: Any) -> Any:
    """Strict JSON has no Infinity/NaN; spell them as strings."""
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


@dataclasses.dataclass
class OutputReport:
    """The comparison of one reference output with its candidate counterpart."""

    name: str
    candidate_name: str
    passed: bool
    dtype: str
    shape: tuple[int, ...]
    tolerance: Tolerance
    atol: float = 0.0  # the effective atol, after scaling
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mean_abs_error: float = 0.0
    max_error_index: tuple[int, ...] | None = None
    reference_value: float | None = None
    candidate_value: float | None = None
    required_atol: float = 0.0
    mismatches: int = 0
    nonfinite_mismatches: int = 0
    elements: int = 0
    message: str = ""

    @property
    def status(self) -> str:
        return "PASSED" if self.passed else "FAILED"

    def __str__(self) -> str:
        label = self.name if self.name == self.candidate_name else f"{self.name} ~ {self.candidate_name}"
        head = f"{label} [{self.dtype} {self.shape}]: {self.status}"
        if self.max_error_index is None:  # nothing compared: shape/dtype mismatch or empty
            return f"{head}\n    {self.message}" if self.message else head
        where = (
            f"at {self.max_error_index} (reference {_fmt(self.reference_value)},"
            f" candidate {_fmt(self.candidate_value)})"
        )
        if self.tolerance.exact:
            lines = [
                head,
                f"    {self.mismatches}/{self.elements} elements differ (exact comparison);"
                f" largest difference {_fmt(self.max_abs_error)} {where}",
            ]
        else:
            lines = [
                head,
                f"    max abs {self.max_abs_error:.3g} {where} | max rel {self.max_rel_error:.3g}"
                f" | mean abs {self.mean_abs_error:.3g}",
                f"    {self.mismatches}/{self.elements} elements outside atol={self.atol:.3g}"
                f" rtol={self.tolerance.rtol:.3g}; would pass with atol >= {self.required_atol:.3g}",
            ]
        if self.nonfinite_mismatches:
            lines.append(f"    {self.nonfinite_mismatches} NaN/Inf elements that do not match")
        if self.message:
            lines.append(f"    {self.message}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite floats become the strings "inf"/"nan"."""
        out = {k: _json_float(v) for k, v in dataclasses.asdict(self).items()}
        out["tolerance"] = dataclasses.asdict(self.tolerance)
        out["status"] = self.status
        out["shape"] = list(self.shape)
        out["max_error_index"] = None if self.max_error_index is None else list(self.max_error_index)
        return out


@dataclasses.dataclass
class ComparisonReport:
    """All outputs of one example; ``matched_by`` says how outputs were paired."""

    outputs: list[OutputReport]
    matched_by: str = "name"

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failed_outputs(self) -> list[OutputReport]:
        return [o for o in self.outputs if not o.passed]

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        n_fail = len(self.failed_outputs)
        head = f"comparison {status}: {len(self.outputs) - n_fail}/{len(self.outputs)} outputs match"
        if self.matched_by != "name":
            head += f" (outputs matched by {self.matched_by})"
        return "\n".join([head, *(str(o) for o in self.outputs)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "matched_by": self.matched_by,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _as_float64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


#: Elements compared at a time: float64 temporaries of a large output (an LM's
#: logits, tens of millions of elements) would otherwise cost several times
#: the output itself, and a verification of a real model ran out of budget on them.
_CHUNK = 1 << 16


class _Totals:
    """The comparison's statistics accumulated over chunks of the flattened arrays, in element order."""

    def __init__(self) -> None:
        self.nonfinite_bad = 0
        self.first_nonfinite_bad = 0
        self.outside = 0
        self.finite = 0
        self.diff_sum = 0.0
        self.max_diff = 0.0
        self.worst = 0
        self.max_rel = 0.0
        self.required = 0.0

    def add(self, offset: int, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> None:
        a, b = _as_float64(reference), _as_float64(candidate)
        finite = np.isfinite(a) & np.isfinite(b)
        # Non-finite positions agree only when both are NaN or both the same Inf.
        nonfinite_agree = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
        nonfinite_bad = ~finite & ~nonfinite_agree
        bad = int(nonfinite_bad.sum())
        if bad and not self.nonfinite_bad:
            self.first_nonfinite_bad = offset + int(np.argmax(nonfinite_bad))
        self.nonfinite_bad += bad
        abs_ref = np.abs(a)
        with np.errstate(invalid="ignore", over="ignore"):
            if reference.dtype.kind in "iu":  # int64 differences are exact before the cast
                delta = (reference.astype(np.int64) - candidate.astype(np.int64)).astype(np.float64)
            else:
                delta = a - b
            diff = np.where(finite, np.abs(delta), 0.0)
            # Relative error over elements whose reference is nonzero; a zero
            # reference has no meaningful relative error (atol covers it).
            nonzero = finite & (abs_ref > 0)
            rel = np.where(nonzero, diff / np.where(nonzero, abs_ref, 1.0), 0.0)
        if _is_float(reference.dtype):
            outside = finite & (diff > atol + rtol * abs_ref)
        else:  # exact, and without the float64 round trip that hides int64 differences
            outside = np.asarray(reference != candidate)
        self.outside += int(outside.sum())
        self.finite += int(finite.sum())
        self.diff_sum += float(diff[finite].sum())
        top = int(np.argmax(diff))
        if diff[top] > self.max_diff or offset == 0:
            self.max_diff, self.worst = float(diff[top]), offset + top
        self.max_rel = max(self.max_rel, float(rel.max()))
        self.required = max(self.required, float(np.max(np.where(finite, diff - rtol * abs_ref, 0.0))))


def compare_arrays(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    tolerance: Tolerance | None = None,
    *,
    candidate_name: str | None = None,
) -> OutputReport:
    """Compare one pair of arrays; the tolerance defaults by the reference dtype."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    tol = tolerance if tolerance is not None else default_tolerance(reference.dtype)
    report = OutputReport(
        name=name,
        candidate_name=candidate_name or name,
        passed=False,
        dtype=str(reference.dtype),
        shape=tuple(reference.shape),
        tolerance=tol,
        atol=tol.atol,
        elements=int(reference.size),
    )
    if reference.dtype != candidate.dtype:
        report.message = f"dtype differs: reference {reference.dtype}, candidate {candidate.dtype}"
        return report
    if reference.shape != candidate.shape:
        report.message = (
            f"shape differs: reference {tuple(reference.shape)}, candidate {tuple(candidate.shape)}"
        )
        return report
    if reference.size == 0:
        report.passed = True
        return report
    if reference.dtype == object or reference.dtype.kind in "SUO":
        equal = np.asarray(reference == candidate)
        report.mismatches = int((~equal).sum())
        report.passed = report.mismatches == 0
        if not report.passed:
            idx = np.unravel_index(int(np.argmin(equal)), reference.shape)
            report.max_error_index = tuple(int(i) for i in idx)
            report.message = f"{report.mismatches} string elements differ"
        return report

    ref_flat, cand_flat = reference.reshape(-1), candidate.reshape(-1)
    chunks = [slice(i, i + _CHUNK) for i in range(0, ref_flat.size, _CHUNK)]
    if tol.scale_atol:
        peaks = [np.abs(x[np.isfinite(x)]).max(initial=-np.inf) for x in map(_as_float64, (ref_flat[c] for c in chunks))]
        peak = max(peaks)
        scale = max(tol.atol_floor, float(peak)) if np.isfinite(peak) else tol.atol_floor
        report.atol = tol.atol * scale
    stats = _Totals()
    for c in chunks:
        stats.add(c.start, ref_flat[c], cand_flat[c], report.atol, tol.rtol)
    report.nonfinite_mismatches = stats.nonfinite_bad
    report.mismatches = stats.outside + report.nonfinite_mismatches
    report.mean_abs_error = stats.diff_sum / stats.finite if stats.finite else 0.0
    report.max_abs_error = stats.max_diff
    report.max_rel_error = stats.max_rel
    report.required_atol = float(max(0.0, stats.required))

    if report.nonfinite_mismatches:
        worst = stats.first_nonfinite_bad
        report.max_abs_error = float("inf")
        report.max_rel_error = float("inf")
        report.required_atol = float("inf")
        report.message = "non-finite values where the other graph is finite, or NaN vs Inf"
    else:
        worst = stats.worst
    idx = np.unravel_index(worst, reference.shape)
    report.max_error_index = tuple(int(i) for i in idx)
    report.reference_value = float(reference[idx])
    report.candidate_value = float(candidate[idx])
    report.passed = report.mismatches == 0
    return report


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    pairs: Iterable[tuple[str, str]],
    *,
    tolerances: Mapping[str, Tolerance] | None = None,
    matched_by: str = "name",
) -> ComparisonReport:
    """Compare each (reference name, candidate name) pair.

    ``tolerances`` overrides the dtype default per reference output name.
    """
    tolerances = tolerances or {}
    reports: list[OutputReport] = []
    for ref_name, cand_name in pairs:
        reports.append(
            compare_arrays(
                ref_name,
                reference[ref_name],
                candidate[cand_name],
                tolerances.get(ref_name),
                candidate_name=cand_name,
            )
        )
    return ComparisonReport(reports, matched_by=matched_by)


def identity_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    return [(n, n) for n in names]

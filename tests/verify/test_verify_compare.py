"""Output comparison: dtype tolerances, non-finite values, Polygraphy-style statistics."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.verify import Tolerance, compare_arrays, compare_outputs, default_tolerance


def test_statistics_locate_the_largest_error() -> None:
    ref = np.zeros((2, 3), np.float32)
    cand = ref.copy()
    cand[1, 2] = 0.5
    cand[0, 0] = 0.1
    report = compare_arrays("y", ref, cand)
    assert not report.passed and report.status == "FAILED"
    assert report.max_abs_error == pytest.approx(0.5)
    assert report.max_error_index == (1, 2)
    assert report.reference_value == 0.0 and report.candidate_value == pytest.approx(0.5)
    assert report.mean_abs_error == pytest.approx(0.6 / 6)
    assert report.mismatches == 2


def test_required_atol_is_the_smallest_that_passes() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 5)).astype(np.float32)
    cand = ref + rng.normal(scale=1e-2, size=ref.shape).astype(np.float32)
    rtol = 1e-4
    report = compare_arrays("y", ref, cand, Tolerance(1e-6, rtol, scale_atol=False))
    assert not report.passed
    needed = report.required_atol
    assert compare_arrays("y", ref, cand, Tolerance(needed * 1.0001, rtol, scale_atol=False)).passed
    assert not compare_arrays("y", ref, cand, Tolerance(needed * 0.99, rtol, scale_atol=False)).passed


def test_relative_error_ignores_zero_references() -> None:
    report = compare_arrays("y", np.array([0.0, 2.0], np.float32), np.array([1e-6, 2.2], np.float32))
    assert report.max_rel_error == pytest.approx(0.1, rel=1e-3)


@pytest.mark.parametrize(
    "ref, cand",
    [([np.nan, 1.0], [np.nan, 1.0]), ([np.inf, -np.inf], [np.inf, -np.inf])],
    ids=["nan-nan", "inf-inf"],
)
def test_matching_non_finite_values_agree(ref, cand) -> None:
    assert compare_arrays("y", np.array(ref, np.float32), np.array(cand, np.float32)).passed


@pytest.mark.parametrize(
    "ref, cand",
    [([1.0, 2.0], [np.nan, 2.0]), ([1.0, 2.0], [np.inf, 2.0]), ([np.inf, 2.0], [1.0, 2.0]), ([np.inf], [-np.inf]), ([np.nan], [np.inf])],
    ids=["nan-where-finite", "inf-where-finite", "finite-where-inf", "inf-sign", "nan-vs-inf"],
)
def test_non_finite_mismatches_fail(ref, cand) -> None:
    report = compare_arrays("y", np.array(ref, np.float32), np.array(cand, np.float32))
    assert not report.passed
    assert report.nonfinite_mismatches == 1
    assert "NaN/Inf" in str(report)


def test_shape_and_dtype_mismatches_fail_with_a_clear_message() -> None:
    shape = compare_arrays("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert not shape.passed and "shape differs" in shape.message and "(2, 3)" in str(shape)
    dtype = compare_arrays("y", np.zeros(3, np.float32), np.zeros(3, np.float16))
    assert not dtype.passed and "dtype differs" in dtype.message and "float16" in str(dtype)


def test_integers_and_bools_compare_exactly() -> None:
    big = np.array([2**60, 5], np.int64)
    assert not compare_arrays("ids", big, big + np.array([1, 0])).passed  # no float64 rounding
    assert compare_arrays("ids", big, big.copy()).passed
    flags = np.array([True, False])
    assert not compare_arrays("m", flags, ~flags).passed
    assert default_tolerance(np.int64).exact and default_tolerance(np.bool_).exact


def test_half_precisions_are_compared_more_loosely_than_fp32() -> None:
    ref = np.linspace(0.5, 1.0, 16)
    cand = ref * (1 + 3e-3)
    assert not compare_arrays("y", ref.astype(np.float32), cand.astype(np.float32)).passed
    assert compare_arrays("y", ref.astype(np.float16), cand.astype(np.float16)).passed
    bf = ml_dtypes.bfloat16
    assert compare_arrays("y", ref.astype(bf), (ref * 1.02).astype(bf)).passed
    assert not compare_arrays("y", ref.astype(bf), (ref * 1.2).astype(bf)).passed
    tolerances = [default_tolerance(t).atol for t in (np.float64, np.float32, np.float16, bf)]
    assert tolerances == sorted(tolerances)


def test_atol_scales_with_the_output_magnitude() -> None:
    # Cancellation: an element near 0 inside an output of magnitude 1e3 carries
    # an absolute rounding error relative to 1e3, not to itself.
    ref = np.array([1000.0, 1e-6], np.float32)
    cand = np.array([1000.0, 0.05], np.float32)
    assert compare_arrays("y", ref, cand).passed
    assert not compare_arrays("y", ref, cand, Tolerance(1e-4, 1e-4, scale_atol=False)).passed
    assert not compare_arrays("y", ref, np.array([1000.0, 0.5], np.float32)).passed


def test_report_reads_like_polygraphy_and_serializes_to_strict_json() -> None:
    report = compare_outputs(
        {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)},
        {"a": np.ones(3, np.float32), "b": np.array([0.0, np.inf], np.float32)},
        [("a", "a"), ("b", "b")],
    )
    assert not report.passed
    text = str(report)
    assert "1/2 outputs match" in text
    assert "a [float32 (3,)]: PASSED" in text and "b [float32 (2,)]: FAILED" in text
    assert "max abs" in text and "would pass with atol" in text
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [o["status"] for o in data["outputs"]] == ["PASSED", "FAILED"]
    assert data["outputs"][1]["max_abs_error"] == "inf"


def test_per_output_tolerance_overrides_the_dtype_default() -> None:
    ref = {"y": np.ones(2, np.float32)}
    cand = {"y": np.full(2, 1.01, np.float32)}
    assert not compare_outputs(ref, cand, [("y", "y")]).passed
    assert compare_outputs(ref, cand, [("y", "y")], tolerances={"y": Tolerance(0.0, 0.02)}).passed


_SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e-30])


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e-2, 1e-2), st.integers(0, 6), _SPECIAL),
                  min_size=1, max_size=60),
    chunk=st.integers(1, 9),
)
def test_comparing_in_chunks_reports_what_comparing_at_once_does(data, chunk):
    """Large outputs are compared a chunk at a time (memory); every statistic must be the whole array's."""
    import qgraph.verify.compare as compare

    ref = np.array([x for x, _, _, _ in data], np.float32)
    cand = ref + np.array([d for _, d, _, _ in data], np.float32)
    for i, (_, _, where, special) in enumerate(data):  # a few non-finite or extreme elements on either side
        if where == 0:
            ref[i] = special
        elif where == 1:
            cand[i] = special
    whole = compare.compare_arrays("y", ref, cand)
    saved = compare._CHUNK
    compare._CHUNK = chunk
    try:
        chunked = compare.compare_arrays("y", ref, cand)
    finally:
        compare._CHUNK = saved
    for field in ("passed", "mismatches", "nonfinite_mismatches", "max_abs_error", "max_rel_error", "required_atol",
                  "atol", "max_error_index", "message"):
        assert getattr(chunked, field) == getattr(whole, field), field
    both = [whole.reference_value, chunked.reference_value]
    assert both[0] == both[1] or (np.isnan(both[0]) and np.isnan(both[1]))
    assert chunked.mean_abs_error == pytest.approx(whole.mean_abs_error, rel=1e-9, abs=1e-12)

"""Weights in patterns: any size, by dtype, shape and predicate, read only when needed.

The trap this guards against: ``op.const`` used to refuse any constant over
4096 elements, so a rule "worked" on the 64x64 tiny zoo and silently matched
nothing at a real width.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import FLOAT, const, make_model, run
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.rewrite import Rule, RuleSet, apply_rules, explain


class UnreadableTensor(ir.ExternalTensor):
    """A weight whose bytes are not on disk: any read of its values fails the test."""

    def numpy(self):  # noqa: D102
        raise AssertionError(f"weight '{self.name}' was read")

    def tobytes(self):  # noqa: D102
        raise AssertionError(f"weight '{self.name}' was read")


def unreadable(op, shape, name, dtype=FLOAT):
    tensor = UnreadableTensor("missing.bin", offset=0, length=int(np.prod(shape)) * 4, dtype=dtype,
                              shape=ir.Shape(shape), name=name, base_dir="/nonexistent")
    return op.initializer(tensor)


def matmul_graph(width, weight=None):
    def build(op, x):
        w = weight(op) if weight is not None else const(op, np.full((width, width), 0.5, np.float32), "w")
        return op.MatMul(x, w)

    return make_model(build, {"x": (FLOAT, ("B", width))})


def double_by_weight(op, x):
    return op.MatMul(x, op.weight("w", dtype=FLOAT, shape=("H", "H")))


def to_scaled(op, x, w):
    return op.Gemm(x, w, alpha=2.0)


WEIGHT_RULE = RuleSet([Rule("scale-matmul", double_by_weight, to_scaled)])


@settings(max_examples=8, deadline=None)
@given(width=st.sampled_from([8, 64, 65, 256]))
def test_weight_matches_any_size_by_dtype_and_shape(width):
    model = matmul_graph(width)
    assert apply_rules(model, WEIGHT_RULE).matches == {"scale-matmul": 1}


def test_weight_dtype_and_shape_are_checked_without_reading_the_values():
    model = matmul_graph(512, weight=lambda op: unreadable(op, (512, 512), "w"))
    assert apply_rules(model, WEIGHT_RULE).matches == {"scale-matmul": 1}


def test_weight_with_another_shape_is_a_near_miss_naming_the_shape():
    model = matmul_graph(512, weight=lambda op: unreadable(op, (512, 512), "w"))

    def wide(op, x):
        return op.MatMul(x, op.weight("w", shape=(512, 1024)))

    (candidate,) = explain(model, Rule("wide", wide, to_scaled))
    assert not candidate.matched
    assert "dim 512 is not 1024" in candidate.reason


def test_weight_does_not_match_a_computed_value():
    model = make_model(lambda op, x: op.MatMul(x, op.Transpose(x)), {"x": (FLOAT, (4, 4))})
    (candidate,) = explain(model, WEIGHT_RULE)
    assert not candidate.matched and "not a constant" in candidate.reason


def test_weight_predicate_reads_large_weights_and_binds_the_value():
    seen = []

    def positive(array):
        seen.append(array.size)
        return bool((array > 0).all())

    def pattern(op, x):
        return op.MatMul(x, op.weight("w", pred=positive))

    def replacement(op, x, w):
        assert isinstance(w, ir.Value) and w.const_value is not None
        return op.Gemm(x, w)

    model = matmul_graph(128)
    assert apply_rules(model, RuleSet([Rule("positive", pattern, replacement)])).matches == {"positive": 1}
    assert seen == [128 * 128]


def test_const_predicate_is_not_limited_in_size():
    def pattern(op, x):
        return op.MatMul(x, op.const(pred=lambda a: a.shape == (100, 100), name="w"))

    model = matmul_graph(100)
    reference = model.clone()
    stats = apply_rules(model, RuleSet([Rule("big-const", pattern, lambda op, x, w: op.Gemm(x, op.const(w)))]))
    assert stats.matches == {"big-const": 1}
    feeds = {"x": np.ones((2, 100), np.float32)}
    np.testing.assert_allclose(run(reference, feeds)[0], run(model, feeds)[0])


def test_const_value_of_another_shape_fails_without_reading_the_weight():
    model = matmul_graph(512, weight=lambda op: unreadable(op, (512, 512), "w"))

    def pattern(op, x):
        return op.MatMul(x, op.const(np.ones((4, 4), np.float32)))

    (candidate,) = explain(model, Rule("small", pattern, to_scaled))
    assert not candidate.matched and "elements" in candidate.reason


def test_scalar_value_against_a_large_weight_is_a_reported_near_miss():
    model = matmul_graph(512, weight=lambda op: unreadable(op, (512, 512), "w"))

    def pattern(op, x):
        return op.MatMul(x, op.const(0.5, name="w"))

    (candidate,) = explain(model, Rule("uniform", pattern, to_scaled))
    assert not candidate.matched
    assert "262144 elements" in candidate.reason and "not read" in candidate.reason


@pytest.mark.parametrize("width", [4, 80])
def test_scalar_value_matches_a_uniform_constant_up_to_the_documented_size(width):
    def pattern(op, x):
        return op.MatMul(x, op.const(0.5, name="w"))

    matched = apply_rules(matmul_graph(width), RuleSet([Rule("uniform", pattern, to_scaled)])).matches
    assert matched == ({"uniform": 1} if width * width <= 4096 else {})

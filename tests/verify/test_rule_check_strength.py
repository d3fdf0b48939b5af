"""verify-rules is as strong and as talkative as --verify.

Traps this guards against: a wrong GELU rule (exact-erf ``Gelu`` replacing
the tanh approximation, at most 4.7e-4 apart near |x| = 2.7) passed the
self-check at its default settings; a failure was one line without numbers,
inputs or a reproduction command; a replacement that raised was labelled
"not-equivalent".
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap

import numpy as np
import onnx_ir as ir
import pytest
from framework_passes import registry_with_test_passes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qgraph.registry
from qgraph.cli import main
from qgraph.rewrite import Rule
from qgraph.verify.rule_check import RULE_CHECK_INPUTS, check_rule
from qgraph.verify.strategies import spread_float_arrays

GELU_PLUGIN = textwrap.dedent('''
    """Test plugin: the tanh-approximated GELU, fused right and wrong."""
    import math

    from qgraph import RewritePass, Rule, RuleSet

    def gelu_tanh(op, x):
        cubic = op.Add(x, op.Mul(op.const(0.044715, rtol=1e-3), op.Pow(x, 3.0)))
        inner = op.Tanh(op.Mul(op.const(math.sqrt(2 / math.pi), rtol=1e-4), cubic))
        return op.Mul(op.Mul(0.5, x), op.Add(1.0, inner))

    RIGHT = Rule("gelu-tanh", gelu_tanh, lambda op, x: op.Gelu(x, approximate="tanh"))
    WRONG = Rule("gelu-tanh-as-erf", gelu_tanh, lambda op, x: op.Gelu(x))

    class GeluPasses(RewritePass):
        """GELU fusions, one of them wrong (test plugin)."""

        name = "test-gelu"
        rules = RuleSet([RIGHT, WRONG])
''')


def gelu_tanh(op, x):
    cubic = op.Add(x, op.Mul(op.const(0.044715, rtol=1e-3), op.Pow(x, 3.0)))
    inner = op.Tanh(op.Mul(op.const(math.sqrt(2 / math.pi), rtol=1e-4), cubic))
    return op.Mul(op.Mul(0.5, x), op.Add(1.0, inner))


ERF_FOR_TANH = Rule("gelu-tanh-as-erf", gelu_tanh, lambda op, x: op.Gelu(x))
TANH = Rule("gelu-tanh", gelu_tanh, lambda op, x: op.Gelu(x, approximate="tanh"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_check_catches_erf_gelu_replacing_the_tanh_approximation(seed):
    result = check_rule(ERF_FOR_TANH, seed=seed)
    assert not result.ok
    assert result.variants[0].status == "not-equivalent"


def test_the_right_gelu_replacement_holds():
    result = check_rule(TANH)
    assert result.ok, str(result)


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_spread_draw_covers_every_decade_of_the_range(data):
    low, high = RULE_CHECK_INPUTS.float_exponents
    shape = (RULE_CHECK_INPUTS.dim_range[0],) * 3  # the smallest [B, S, H] the check draws
    array = data.draw(spread_float_arrays(shape, np.float32, exponents=(low, high)))
    magnitudes = np.abs(array[array != 0])
    decades = set(np.floor(np.log10(magnitudes)).astype(int).tolist())
    assert set(range(low, high)) <= decades  # every decade from 10**low up to 10**high is present
    assert (array > 0).any() and (array < 0).any()


def test_a_replacement_that_raises_is_an_error_of_the_rule_with_its_traceback():
    def broken(op, x):
        return op.Gelu(x, approximate=len(x))  # TypeError: an ir.Value has no len()

    result = check_rule(Rule("broken-gelu", gelu_tanh, broken))
    (variant,) = result.variants
    assert variant.status == "error"
    assert "TypeError" in variant.detail and "in broken" in variant.detail and "Traceback" in variant.detail
    assert "not-equivalent" not in str(result)


def test_a_failure_reports_the_worst_element_saved_inputs_and_a_command_that_reproduces_it(tmp_path):
    result = check_rule(ERF_FOR_TANH, artifacts_dir=tmp_path)
    (variant,) = result.variants
    text = str(result)
    assert "max abs" in text and "at (" in text  # the worst element, Polygraphy-style
    assert variant.equivalence is not None and variant.equivalence.inputs_path is not None
    assert variant.equivalence.inputs_path.startswith(str(tmp_path))
    command = variant.equivalence.reproduction
    assert command is not None and command in text
    args = command.split()
    assert args[:3] == ["python", "-m", "qgraph.verify"]
    replayed = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr


@pytest.fixture
def gelu_plugin(tmp_path, monkeypatch):
    monkeypatch.delenv("QGRAPH_PLUGINS", raising=False)
    monkeypatch.setattr(qgraph.registry, "_DEFAULT", registry_with_test_passes())
    path = tmp_path / "gelu_plugin.py"
    path.write_text(GELU_PLUGIN)
    return path


def test_verify_rules_command_catches_the_wrong_gelu_at_its_defaults(gelu_plugin):
    out = io.StringIO()
    code = main(["verify-rules", "--plugin", str(gelu_plugin), "--rule", "gelu-tanh", "--rule", "gelu-tanh-as-erf"], out=out)
    text = out.getvalue()
    assert code == 1, text
    assert "PASS gelu-tanh " in text and "FAIL gelu-tanh-as-erf" in text
    assert "reproduce: python -m qgraph.verify" in text and "inputs saved to" in text


def test_verify_rules_takes_examples_and_seed(gelu_plugin):
    out = io.StringIO()
    code = main(["verify-rules", "--plugin", str(gelu_plugin), "--rule", "gelu-tanh", "--examples", "3", "--seed", "7"],
                out=out)
    assert code == 0
    assert "3 examples" in out.getvalue() and "seed 7" in out.getvalue()


def test_weights_in_a_pattern_are_checked_as_initializers():
    def pattern(op, x):
        return op.MatMul(x, op.weight("w", dtype=ir.DataType.FLOAT, shape=("H", "N")))

    right = Rule("matmul-as-gemm", pattern, lambda op, x, w: op.Gemm(x, w),
                 example_inputs={"x": (ir.DataType.FLOAT, ("B", "H"))})
    wrong = Rule("matmul-as-gemm-t", pattern, lambda op, x, w: op.Gemm(x, w, alpha=1.01),
                 example_inputs={"x": (ir.DataType.FLOAT, ("B", "H"))})
    assert check_rule(right).ok, str(check_rule(right))
    result = check_rule(wrong)
    assert not result.ok and result.variants[0].status != "cannot-build", str(result)


@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT, np.float32, np.dtype("float32"), "float32"])
def test_example_inputs_take_numpy_dtypes_as_well_as_ir_ones(dtype):
    def pattern(op, x, w):
        return op.Mul(op.Neg(op.Neg(x)), w)

    rule = Rule("neg-neg-scale", pattern, lambda op, x, w: op.Mul(x, w), example_inputs={"w": (dtype, ("H",))})
    result = check_rule(rule, examples=3)
    assert result.ok, str(result)


def double_negation(op, x):
    return op.Neg(op.Neg(x))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.nested_given])
@given(center=st.floats(-3, 2), seed=st.integers(0, 2**16))
def test_a_small_difference_in_any_narrow_band_of_the_range_is_caught_at_the_defaults(center, seed):
    """A replacement off by 1e-3 (relative above |x| = 1) on one octave of |x| anywhere in 1e-3..1e2."""
    low, high = 10.0 ** center / math.sqrt(2), 10.0 ** center * math.sqrt(2)

    def off_in_band(op, x):
        magnitude = op.Abs(x)
        inside = op.And(op.GreaterOrEqual(magnitude, low), op.LessOrEqual(magnitude, high))
        return op.Where(inside, op.Add(x, op.Mul(op.Max(magnitude, 1.0), 1e-3)), x)

    result = check_rule(Rule("off-in-a-band", double_negation, off_in_band), seed=seed)
    assert not result.ok, f"a 1e-3 difference for {low:.3g} <= |x| <= {high:.3g} went unnoticed"

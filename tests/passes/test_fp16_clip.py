"""fp16-clip: constants and calibrated activations end inside the fp16 range, and only where it matters."""

from __future__ import annotations

import json
import re
import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest
from fp16_graphs import (
    F32_MAX,
    FP16_MAX,
    FP16_OVERFLOW,
    SITES,
    constant_arrays,
    constant_site_model,
    copies,
    expected_clip,
    masked_attention_model,
    run,
    scale_chain_model,
    site_feeds,
)
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from qgraph_passes.fp16_clip import FP16ClipPass

from qgraph import io as qio
from qgraph.cli import main as cli_main
from qgraph.verify import save_inputs
from qgraph.verify.fp16 import check_fp16, compare_fp16, emulate_fp16

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _same_floats(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Bitwise equality (so -0.0 != 0.0 and NaN == NaN)."""
    return np.asarray(actual, np.float32).tobytes() == np.asarray(expected, np.float32).tobytes()


# ------------------------------------------------------------------ constants


@pytest.mark.parametrize("site", SITES)
@settings(SETTINGS, max_examples=10)
@given(values=constant_arrays(), flush=st.booleans())
@example(values=np.array([1e6, -3.4e38, -np.inf, np.nan, 1e-9, 1.0], np.float32), flush=True)
@example(values=np.array([-3.4e38, 65505.0, 2e-8, -0.0], np.float32), flush=False)
def test_every_constant_site_is_clipped_by_the_rules(site, values, flush):
    scalar_site = site in ("constant-value-float", "constant-of-shape")
    values = values[:1] if scalar_site else values
    model = constant_site_model(site, values)
    before = [run(model, feeds)["y"] for feeds in site_feeds(site)]
    clip = FP16ClipPass(flush_subnormals=flush)
    clip(model)
    after = [run(model, feeds)["y"] for feeds in site_feeds(site)]

    for old, new in zip(before, after, strict=True):
        expected = expected_clip(old, flush=flush)
        assert _same_floats(new, expected), (values, new, expected)
        with np.errstate(over="ignore"):
            assert np.array_equal(np.isfinite(new.astype(np.float16)), np.isfinite(old))  # no new inf in fp16
    beyond = int(np.sum(np.isfinite(values) & (np.abs(values) > FP16_MAX)))
    tiny = int(np.sum((np.abs(values) > 0) & (np.abs(values) < 2.0**-24))) if flush else 0
    n = copies(site)
    assert clip.report.rule_matches["elements-clipped"] == n * beyond
    assert clip.report.rule_matches["constants-clipped"] == n * int(beyond + tiny > 0)
    if flush:
        assert clip.report.rule_matches["elements-flushed"] == n * tiny
    finite = np.abs(values[np.isfinite(values)])
    largest = float(finite.max()) if finite.size else 0.0
    if largest > 0:
        match = re.search(r"largest finite magnitude (\S+)", " ".join(clip.report.notes))
        assert match and float(match.group(1)) == pytest.approx(largest, rel=1e-5)


@SETTINGS
@given(values=hnp.arrays(np.float32, st.integers(1, 20), elements=st.floats(-FP16_MAX, FP16_MAX, width=32)))
def test_a_model_already_in_range_is_left_alone(values):
    model = constant_site_model("initializer", values)
    tensor = model.graph.initializers["c"].const_value
    result = FP16ClipPass()(model)
    assert not result.modified
    assert model.graph.initializers["c"].const_value is tensor


# ---------------------------------------------------- masked attention (mask fill)


@st.composite
def attention_cases(draw):
    batch, seq = draw(st.integers(1, 2)), draw(st.integers(2, 5))
    # A mask fill: large enough that fp32 swallows any score added to it
    # (|fill| >= 2**24 * 16 > 2.7e8), as finfo.min and -1e9 do.
    fill = draw(st.sampled_from([-F32_MAX, -1e9]) | st.floats(-F32_MAX, -1e9, width=32))
    keep = draw(hnp.arrays(np.bool_, (batch, seq, seq)))
    keep[0, 0, :] = False  # a fully masked row: a left-padded query position
    scores = draw(hnp.arrays(np.float32, (batch, seq, seq), elements=st.floats(-8, 8, width=32)))
    v = draw(hnp.arrays(np.float32, (batch, seq, 4), elements=st.floats(-4, 4, width=32)))
    return fill, {"scores": scores, "keep": keep, "v": v}, draw(st.booleans())


@SETTINGS
@given(case=attention_cases())
def test_mask_fill_overflows_in_fp16_before_and_is_finite_and_close_after(case):
    fill, feeds, additive = case
    original = masked_attention_model(fill, additive=additive)
    reference = run(original, feeds)

    emulated_before = run(emulate_fp16(original), feeds)["y"]
    assert not np.isfinite(emulated_before).all()  # the fill became -inf: a fully masked row is NaN

    clipped = original.clone()
    FP16ClipPass()(clipped)
    emulated_after = run(emulate_fp16(clipped), feeds)
    assert np.isfinite(emulated_after["y"]).all()
    assert compare_fp16(reference, emulated_after).passed

    # In fp32 the clipped fill only changes rows where every key is masked
    # (-3.4e38 swallows the score added to it, -65504 does not).
    fp32_after = run(clipped, feeds)["y"]
    partly_masked = feeds["keep"].any(axis=-1)
    np.testing.assert_array_equal(fp32_after[partly_masked], reference["y"][partly_masked])


# ------------------------------------------------------ external data, streamed


def _external_model(folder, arrays: dict[str, np.ndarray]):
    inits, nodes, current = [], [], None
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([arrays[next(iter(arrays))].size]))
    current = x
    for name, array in arrays.items():
        w = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
        inits.append(w)
        node = ir.node("Add", [current, w], name=f"add_{name}")
        node.outputs[0].name = f"after_{name}"
        nodes.append(node)
        current = node.outputs[0]
    graph = ir.Graph([x], [current], nodes=nodes, initializers=inits, opset_imports={"": 18})
    path = folder / "model.onnx"
    qio.save(ir.Model(graph, ir_version=10), path, external_data=True)
    return path


def test_external_weights_are_streamed_one_tensor_at_a_time_and_written_back(tmp_path):
    size = 1 << 21  # 8 MiB per tensor
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(6):
        a = rng.standard_normal(size).astype(np.float32)
        if i % 3 != 2:  # four of six out of range
            a[rng.integers(0, size, 1000)] = rng.choice([1e6, -3.4e38, np.inf, -np.inf], 1000)
        arrays[f"w{i}"] = a
    (tmp_path / "in").mkdir()
    model = qio.load(_external_model(tmp_path / "in", arrays))
    originals = {n: v.const_value for n, v in model.graph.initializers.items()}
    assert all(isinstance(t, ir.ExternalTensor) for t in originals.values())

    clip = FP16ClipPass()
    tracemalloc.start()
    clip(model)
    _, pass_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Scanned in chunks, nothing clipped is materialized yet: far below one tensor.
    assert pass_peak < size * 4 // 2, pass_peak

    for name, tensor in originals.items():
        assert tensor.raw is None  # every mapping the pass opened was closed again
        now = model.graph.initializers[name].const_value
        if name in ("w2", "w5"):
            assert now is tensor  # in range: the same lazy tensor, still on disk
        else:
            assert now is not tensor and not isinstance(now, ir.ExternalTensor)
            assert _same_floats(tensor.numpy(), arrays[name])  # the original object is untouched
    assert clip.report.rule_matches["constants-clipped"] == 4

    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    tracemalloc.start()
    qio.save(model, out, external_data=True)
    _, save_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # One clipped copy at a time (four exist in total: 32 MiB).
    assert save_peak < 2.5 * size * 4, save_peak

    saved = qio.load(out)
    for name, array in arrays.items():
        tensor = saved.graph.initializers[name].const_value
        assert isinstance(tensor, ir.ExternalTensor)
        assert _same_floats(tensor.numpy(), expected_clip(array, flush=False))


# ----------------------------------------------------------------- activations


@st.composite
def scale_chains(draw):
    scales = draw(st.lists(st.sampled_from([0.5, 3.0, 20.0, 300.0, 4000.0]), min_size=1, max_size=4))
    x = draw(hnp.arrays(np.float32, st.integers(1, 6), elements=st.floats(-50, 50, width=32)))
    margin = draw(st.sampled_from([1.0, 4.0]))
    return scales, x, margin


def _products(scales, x):
    """max|h_i| of each product in float64, from the definition of the chain."""
    largest, out = float(np.max(np.abs(x.astype(np.float64)))), []
    for s in scales:
        largest *= s
        out.append(largest)
    return out


@SETTINGS
@given(case=scale_chains())
def test_clip_goes_after_exactly_the_producers_that_overflow(tmp_path_factory, case):
    scales, x, margin = case
    expected = _products(scales, x)
    assume(all(abs(m * margin / FP16_OVERFLOW - 1) > 1e-2 for m in expected))  # no borderline fp32 rounding
    inputs = tmp_path_factory.mktemp("calib") / "x.npz"
    save_inputs({"x": x}, inputs)
    model = scale_chain_model(scales)
    original = model.clone()
    clip = FP16ClipPass(activations=True, calibration_inputs=str(inputs), margin=margin)
    clip(model)

    clipped_after = {n.inputs[0].name for n in model.graph if n.op_type == "Clip"}
    assert clipped_after == {f"h{i}" for i, m in enumerate(expected) if m * margin >= FP16_OVERFLOW}
    assert clip.report.rule_matches["activations-clipped"] == len(clipped_after)
    for name in clipped_after:
        assert any(f"'{name}'" in note and "Clip inserted" in note for note in clip.report.notes)

    emulated = run(emulate_fp16(model), {"x": x})["y"]
    assert np.isfinite(emulated).all()
    # Inputs that stay inside the range give exactly the fp32 results of before.
    small = (x / max(1.0, np.prod(scales))).astype(np.float32)
    np.testing.assert_array_equal(run(model, {"x": small})["y"], run(original, {"x": small})["y"])


def test_calibration_draws_inputs_with_the_verification_strategies_and_is_idempotent():
    model = scale_chain_model([1e9])  # overflows unless every drawn |x| is below 6.6e-5
    first = FP16ClipPass(activations=True, calibration_examples=6)
    assert first(model).modified
    assert first.report.rule_matches["activations-clipped"] == 1
    assert re.search(r"'h0' \(Mul 'mul0'\): max \|x\| \S+ = \S+x the fp16 maximum over 6 calibration", " ".join(first.report.notes))
    again = FP16ClipPass(activations=True, calibration_examples=6)
    assert not again(model).modified
    assert sum(n.op_type == "Clip" for n in model.graph) == 1


@pytest.mark.parametrize("opset", [18, 10])  # Clip's bounds: inputs since opset 11, attributes before
def test_an_overflowing_graph_output_keeps_its_name(opset):
    model = scale_chain_model([1e5])
    model.opset_imports[""] = opset
    tanh = next(n for n in model.graph if n.op_type == "Tanh")
    model.graph.outputs.append(model.graph.node("mul0").outputs[0])  # h0 is also an output now
    FP16ClipPass(activations=True, calibration_examples=4)(model)
    assert [v.name for v in model.graph.outputs] == ["y", "h0"]
    h0 = model.graph.outputs[1]
    assert h0.producer().op_type == "Clip"
    assert tanh.inputs[0] is h0
    out = run(model, {"x": np.array([3.0, -2.0], np.float32)})
    np.testing.assert_array_equal(out["h0"], [FP16_MAX, -FP16_MAX])


def test_bad_options_are_bad_input(tmp_path):
    from qgraph.errors import BadInputError

    with pytest.raises(BadInputError, match="margin"):
        FP16ClipPass(margin=0.5)(scale_chain_model([2.0]))
    with pytest.raises(BadInputError, match="no such calibration inputs"):
        FP16ClipPass(activations=True, calibration_inputs=str(tmp_path / "none.npz"))(scale_chain_model([2.0]))


# --------------------------------------------------------------- real exports


@pytest.mark.parametrize(
    ("arch", "exporter"), [("gemma2", "dynamo"), ("gemma2", "torchscript"), ("llama", "dynamo")]
)
def test_real_export_is_wrong_in_fp16_before_and_close_after(tiny_zoo, arch, exporter):
    """gemma2 (eager attention): fp16 turns the mask fill into -inf and padded batches into NaN;
    llama (dynamo SDPA, NaN-guarded): left-padded rows differ. After the pass both match fp32."""
    original = qio.load(tiny_zoo.export(arch, exporter).model_path)
    before = check_fp16(original, examples=8, max_shrink_runs=0, save_artifacts=False)
    assert not before.equivalent
    if arch == "gemma2":
        assert before.report.outputs[0].nonfinite_mismatches > 0
    clipped = original.clone()
    clip = FP16ClipPass()
    clip(clipped)
    assert clip.report.rule_matches["constants-clipped"] >= 1
    after = check_fp16(original, clipped, examples=8)
    assert after.equivalent, str(after)


def test_cli_runs_the_pass_on_a_raw_export(tiny_zoo, tmp_path):
    source = tiny_zoo.export("llama", "dynamo").model_path
    out, report = tmp_path / "clipped.onnx", tmp_path / "report.json"
    code = cli_main(["optimize", str(source), "-o", str(out), "--passes", "fp16-clip", "--report", str(report)])
    assert code == 0
    record = json.loads(report.read_text())["passes"][0]
    assert record["name"] == "fp16-clip"
    assert record["rule_matches"]["constants-clipped"] >= 1
    result = qio.load(out)
    for graph in result.graphs():
        for value in graph.initializers.values():
            array = value.const_value.numpy()
            if array.dtype == np.float32:
                assert not (np.isfinite(array) & (np.abs(array) > FP16_MAX)).any(), value.name
    for node in ir.traversal.RecursiveGraphIterator(result.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.FLOAT:
                array = attr.value.numpy()
                assert not (np.isfinite(array) & (np.abs(array) > FP16_MAX)).any(), node.name


class _ClipsToZero(FP16ClipPass):
    """A wrong fp16-clip: out-of-range constants become 0 instead of ±65504."""

    def call(self, model):
        fill = model.graph.initializers
        for value in fill.values():
            array = value.const_value.numpy()
            if array.dtype == np.float32 and (np.isfinite(array) & (np.abs(array) > FP16_MAX)).any():
                value.const_value = ir.tensor(np.where(np.abs(array) > FP16_MAX, 0, array).astype(np.float32))
        return ir.passes.PassResult(model, modified=True)


def test_the_fp16_step_verifier_accepts_the_pass_and_names_a_wrong_one(tiny_zoo):
    """``--verify`` for fp16 work: each step's output, emulated in fp16, against its fp32 input."""
    from qgraph.manager import PassManager
    from qgraph.verify import NotEquivalentError
    from qgraph.verify.fp16 import fp16_step_verifier

    source = tiny_zoo.export("llama", "dynamo").model_path
    verifier = fp16_step_verifier(examples=6, max_shrink_runs=0, save_artifacts=False)
    report = PassManager([FP16ClipPass()], verifier=verifier).run(qio.load(source))
    assert report.passes[0].verified
    with pytest.raises(NotEquivalentError) as failure:
        PassManager([_ClipsToZero()], verifier=verifier).run(qio.load(source))
    assert failure.value.pass_name == "fp16-clip"


def test_cli_verify_checks_fp16_clip_by_its_declared_fp16_meaning(tiny_zoo, tmp_path):
    """`qgraph optimize --passes fp16-clip --verify` passes on a padded dynamo export.

    Checked in fp32 the clip would be flagged on left-padded rows (-3.4e38
    swallows the score, -65504 does not); the pass declares meaning "fp16",
    so --verify compares the result emulated in fp16 with the fp32 input.
    """
    from qgraph.cli import main

    source = tiny_zoo.export("llama", "dynamo").model_path
    code = main(["optimize", str(source), "-o", str(tmp_path / "clipped.onnx"), "--passes", "fp16-clip",
                 "--verify", "--verify-examples", "6"])
    assert code == 0

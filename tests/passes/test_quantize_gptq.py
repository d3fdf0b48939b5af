"""quantize method=gptq: smaller output error than round to nearest, valid MatMulNBits blocks, run by onnxruntime.

The error property is GPTQ's own objective: on the activations its Hessian
came from, ``||X W - X W_q||`` is what GPTQ reduces, and round to nearest
(``quantize_rtn``) with the same block layout is the baseline. GPTQ is a
greedy method, so it is not better on *every* input: with nearly
uncorrelated activations it can lose by about 1 % (seen: 1.4 % on one of 40
random cases with mixing 0.02), which is why the property draws correlated
activations (mixing >= 0.3, as inside a transformer) and asks for a clear
gain there -- at most 0.9 of RTN's error (seen: 0.81 at worst over 2000
draws) -- so that a GPTQ without its error propagation (which *is* round to
nearest) fails it. Layers have at least 48 input channels and 8 outputs
(SmolLM2's have 576 x 192 and more): on a 16 x 1 weight the corrections can
all stay inside their rounding step and GPTQ then *is* RTN.
With exactly uncorrelated activations nothing propagates and GPTQ must give
round to nearest bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qgraph_passes.quantize import QuantizePass
from qgraph_passes.quantize_calibration import calibration_text, collect_hessians
from test_quantize import matmul_model, nbits_nodes, reference_rtn, tied_model

import qgraph
from qgraph import io as qio
from qgraph.errors import BadInputError
from qgraph.quant_blocks import quantize_rtn, unpack_matmul_nbits
from qgraph.quant_gptq import hessian, quantize_gptq
from qgraph.synthetic import synthetic_decoder
from qgraph.verify.budget import Budget, check_budget, decoder_vocab, fixed_text

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
GAIN = 0.9  # GPTQ's error at most this share of RTN's on correlated activations


@st.composite
def layers(draw, mixing=st.floats(0.3, 1.0)):
    """(weight [K, N], activations [T, K] with correlated channels, bits, block, symmetric)."""
    k, n = draw(st.integers(48, 160)), draw(st.integers(8, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rows = draw(st.integers(2 * k, 4 * k))  # more rows than channels: H has full rank
    mix = np.eye(k) + draw(mixing) * rng.standard_normal((k, k))
    x = (rng.standard_normal((rows, k)) @ mix).astype(np.float32)
    w = (rng.standard_normal((k, n)) * draw(st.sampled_from([0.02, 1.0, 30.0]))).astype(np.float32)
    return w, x, draw(st.sampled_from([4, 8])), draw(st.sampled_from([16, 32, 64])), draw(st.booleans())


def output_error(x: np.ndarray, w: np.ndarray, quantized: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64) @ (w.astype(np.float64) - quantized.astype(np.float64))))


@SETTINGS
@given(layers())
def test_gptq_output_error_is_clearly_below_round_to_nearest(layer):
    w, x, bits, block, symmetric = layer
    gptq = quantize_gptq(w, hessian(x), bits, block, symmetric=symmetric).dequantize()
    rtn = quantize_rtn(w, bits, block, symmetric=symmetric).dequantize()
    assert output_error(x, w, gptq) <= GAIN * output_error(x, w, rtn)


@SETTINGS
@given(layers())
def test_uncorrelated_activations_give_round_to_nearest_exactly(layer):
    w, x, bits, block, symmetric = layer
    h = np.diag(np.diag(hessian(x)))  # no channel correlated with another: nothing to propagate
    gptq = quantize_gptq(w, h, bits, block, symmetric=symmetric)
    rtn = quantize_rtn(w, bits, block, symmetric=symmetric)
    np.testing.assert_array_equal(gptq.codes, rtn.codes)
    np.testing.assert_array_equal(gptq.scales, rtn.scales)
    assert (gptq.zero_points is None) == symmetric
    if not symmetric:
        np.testing.assert_array_equal(gptq.zero_points, rtn.zero_points)


@SETTINGS
@given(layers())
def test_packed_gptq_blocks_are_valid_matmul_nbits(layer):
    """Read back from the packed bytes, every weight is (code - zero point) * scale of its block, codes and zero
    points inside [0, 2**bits - 1], and onnxruntime's MatMulNBits (identity input) returns that weight."""
    w, x, bits, block, symmetric = layer
    q = quantize_gptq(w, hessian(x), bits, block, symmetric=symmetric)
    b, scales, zero_points = q.matmul_nbits_inputs()
    k, n = w.shape
    read = unpack_matmul_nbits(b, scales, zero_points, k=k, n=n, bits=bits, block_size=block)
    top = 2**bits - 1
    assert read.codes.max() <= top
    zero = np.full(scales.shape, 2 ** (bits - 1)) if symmetric else read.zero_points.astype(np.int64)
    assert zero.max() <= top
    blocks_per_column = -(-k // block)
    assert scales.shape == (n, blocks_per_column)
    # symmetric: the sign of the block's largest weight, which sits on code 0; asymmetric: a positive step
    assert np.all(scales != 0) if symmetric else np.all(scales > 0)
    decoded = read.dequantize()
    np.testing.assert_array_equal(decoded, q.dequantize())
    # Every weight of block (n, j) on the grid of that block: (decoded / scale + zero) an integer code.
    per_row = np.repeat(np.arange(blocks_per_column), block)[:k]
    grid = decoded / scales.T[per_row] + zero.T[per_row]
    np.testing.assert_allclose(grid, np.rint(grid), atol=1e-3)
    assert np.rint(grid).min() >= 0 and np.rint(grid).max() <= top
    # onnxruntime's kernel agrees on what the bytes mean.
    nodes = [ir.node("MatMulNBits", [ir.val("A", ir.DataType.FLOAT, ir.Shape([k, k])),
                                     *(_const(name, data) for name, data in (("B", b), ("scales", scales),
                                                                             ("zero_points", zero_points))
                                       if data is not None)],
                     attributes=q.attributes(), domain="com.microsoft")]
    nodes[0].outputs[0].name = "Y"
    graph = ir.Graph([nodes[0].inputs[0]], nodes[0].outputs, nodes=nodes,
                     initializers=[v for v in nodes[0].inputs[1:]], opset_imports={"": 21, "com.microsoft": 1})
    got = run(ir.Model(graph, ir_version=10), {"A": np.eye(k, dtype=np.float32)})["Y"]
    np.testing.assert_allclose(got, decoded, rtol=1e-6, atol=1e-6 * float(np.abs(decoded).max()))


def _const(name: str, data: np.ndarray) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(data, name=name), type=ir.TensorType(ir.DataType.from_numpy(
        data.dtype)), shape=ir.Shape(data.shape))


# --- the pass on a decoder ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder() -> ir.Model:
    return synthetic_decoder(2)


def _fresh(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _float_twin(model: ir.Model) -> ir.Model:
    """``model`` with every MatMulNBits replaced by a MatMul with the weight its blocks decode to."""
    twin = _fresh(model)
    for node in nbits_nodes(twin):
        weight = _decoded(node)
        value = _const(f"{node.name}.decoded", weight)
        twin.graph.register_initializer(value)
        matmul = ir.node("MatMul", [node.inputs[0], value])
        out, old = matmul.outputs[0], node.outputs[0]
        out.type, out.shape = old.type, old.shape
        twin.graph.insert_before(node, matmul)
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        name, old.name, out.name = old.name, None, old.name
        out.name = name
        twin.graph.remove(node, safe=True)
    return twin


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
def test_onnxruntime_runs_the_gptq_graph_as_its_dequantized_float_twin(decoder, bits, symmetric):
    quantized, p = _quantize(decoder, method="gptq", bits=bits, symmetric=symmetric)
    assert p.report.rule_matches["gptq-weights"] == p.report.rule_matches["matmuls-quantized"] == len(
        nbits_nodes(quantized)) > 0
    ids = fixed_text(decoder_vocab(decoder), prompt=12, seed=7)[None, :]
    got = run(quantized, {"input_ids": ids})["logits"]
    expected = run(_float_twin(quantized), {"input_ids": ids})["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_gptq_differs_from_round_to_nearest_and_is_deterministic(decoder):
    gptq_a, _ = _quantize(decoder, method="gptq")
    gptq_b, _ = _quantize(decoder, method="gptq")
    rtn, _ = _quantize(decoder, method="rtn")
    blocks = lambda m: {v.name: v.const_value.numpy().tobytes() for v in m.graph.initializers.values()}  # noqa: E731
    assert blocks(gptq_a) == blocks(gptq_b)
    assert blocks(gptq_a).keys() == blocks(rtn).keys()
    assert blocks(gptq_a) != blocks(rtn)


def test_calibration_text_is_not_the_budget_text(decoder):
    segments = calibration_text(decoder, 150, "quantize")
    assert [len(s) for s in segments] == [64, 64, 22]
    evaluation = fixed_text(decoder_vocab(decoder))  # the prompt --verify's budget continues
    for segment in segments:
        assert not np.array_equal(segment[: len(evaluation)], evaluation)
    assert len({s[:8].tobytes() for s in segments}) == len(segments)  # each segment its own seeded prompt


@pytest.mark.parametrize("symmetric", [False, True])
def test_every_gptq_matmul_beats_round_to_nearest_on_the_calibration_text(decoder, symmetric):
    """Per quantized MatMul, the output error on the activations the pass calibrated on -- ``tr(E^T H E)``,
    ``E = W - W_q`` -- is below round to nearest's: each weight was fitted with its own input's Hessian."""
    gptq, _ = _quantize(decoder, method="gptq", symmetric=symmetric)
    rtn, _ = _quantize(decoder, method="rtn", symmetric=symmetric)
    float_nodes = {n.name: n for n in decoder.graph}
    activations = {n.name: n.inputs[0].name for n in nbits_nodes(gptq)}
    hessians = collect_hessians(decoder, list(activations.values()), calibration_text(decoder, 256, "quantize"),
                                "quantize")
    rtn_weights = {n.name: _decoded(n) for n in nbits_nodes(rtn)}
    assert len(rtn_weights) == len(activations) == 15
    for node in nbits_nodes(gptq):
        weight = _float_weight(float_nodes[node.name.removesuffix("/q4")]).astype(np.float64)
        h = hessians[activations[node.name]]

        def error(quantized: np.ndarray) -> float:
            e = weight - quantized.astype(np.float64)
            return float(np.einsum("kn,kj,jn->", e, h, e))

        assert error(_decoded(node)) < 0.95 * error(rtn_weights[node.name]), node.name


def _float_weight(node: ir.Node) -> np.ndarray:
    w = node.inputs[1]
    if w.const_value is not None:
        return w.const_value.numpy()
    return w.producer().inputs[0].const_value.numpy().T  # Transpose of an initializer


def _decoded(node: ir.Node) -> np.ndarray:
    attrs = {name: node.attributes.get_int(name) for name in ("K", "N", "bits", "block_size")}
    zeros = node.inputs[3].const_value.numpy() if len(node.inputs) > 3 and node.inputs[3] is not None else None
    return unpack_matmul_nbits(node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy(), zeros,
                               k=attrs["K"], n=attrs["N"], bits=attrs["bits"],
                               block_size=attrs["block_size"]).dequantize()


def test_too_few_calibration_tokens_for_a_full_rank_hessian_are_noted(decoder):
    _, few = _quantize(decoder, method="gptq", calibration_tokens=48)
    _, enough = _quantize(decoder, method="gptq", calibration_tokens=256)
    widest = max(n.attributes.get_int("K") for n in nbits_nodes(_quantize(decoder, method="rtn")[0]))
    assert any(f"fewer than the widest MatMul input ({widest})" in note for note in few.report.notes)
    assert not any("fewer than the widest" in note for note in enough.report.notes)


def test_graph_without_a_decoder_interface_is_refused_naming_pass_and_option():
    model = matmul_model(np.ones((32, 4), np.float32))
    with pytest.raises(BadInputError, match=r"quantize: method=gptq needs a decoder graph.*inputs \['A'\]"):
        QuantizePass(method="gptq")(model)


def test_gptq_and_gguf_are_refused_together(decoder):
    with pytest.raises(BadInputError, match="method=gptq and gguf exclude each other"):
        QuantizePass(method="gptq", gguf="some.gguf")(_fresh(decoder))


def _quantize(model: ir.Model, **options) -> tuple[ir.Model, QuantizePass]:
    p = QuantizePass(**options)
    return p(_fresh(model)).model, p


@pytest.mark.slow
def test_ort_int4_preset_with_gptq_on_a_cached_zoo_decoder(tiny_zoo):
    source = tiny_zoo.export("llama", "dynamo").model_path
    fp32 = qgraph.optimize(qio.load(source), preset="ort")
    quantized, report = qgraph.optimize_with_report(qio.load(source), preset="ort-int4",
                                                    options={"quantize": {"method": "gptq"}})
    assert report.passes[-1].op_histogram.get("com.microsoft::MatMulNBits", 0) == 2 * 4 + 1
    # Judged by perplexity only: this random-weight model's next-token distributions are nearly flat
    # (perplexity ~165 of 256), so greedy agreement measures how near the ties are, not the rounding. With
    # the preset's symmetric blocks GPTQ's picks agreed on 15 % of the text here at +1.4 % perplexity, with
    # zero points on 87.5 % at +1.1 %; round to nearest, either way, on 100 % at -1.3 %.
    verdict = check_budget(fp32, quantized, Budget(token_agreement=0.0, perplexity_rise=0.03))
    assert verdict.kind == "decoder" and verdict.within, str(verdict)


def test_tied_lm_head_whose_lookup_reads_the_blocks_is_rounded_to_nearest():
    """The embedding lookup's error is the weight error itself, which GPTQ enlarges to shrink the head's output
    error: a tied head shared with the lookup keeps round to nearest (noted); with a float lookup GPTQ fits it."""
    model, table = _any_length(tied_model(copy=False))
    quantized = QuantizePass(method="gptq", bits=4, block_size=16, calibration_tokens=16)(model).model
    head = nbits_nodes(quantized)[0]
    np.testing.assert_array_equal(_decoded(head), reference_rtn(table.T.copy(), 4, 16, False))
    assert [n for n in quantized.graph if n.op_type == "GatherBlockQuantized"]
    model, _ = _any_length(tied_model(copy=False))
    step = QuantizePass(method="gptq", bits=4, block_size=16, calibration_tokens=16, tied_lookup="float")
    fitted = step(model).model
    assert step.report.rule_matches["gptq-weights"] == 1
    assert not np.array_equal(_decoded(nbits_nodes(fitted)[0]), reference_rtn(table.T.copy(), 4, 16, False))


def _any_length(made: tuple[ir.Model, np.ndarray]) -> tuple[ir.Model, np.ndarray]:
    model, table = made
    model.graph.inputs[0].shape = ir.Shape([1, "seq"])  # calibration feeds texts of its own length
    return model, table

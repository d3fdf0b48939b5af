"""quantize gguf=PATH on packed weights: Q/K/V (and gate/up) packed by pack-matmuls get the GGUF's blocks too.

A packed weight ``[Wq | Wk | Wv]`` is no single GGUF tensor; each part is.
MatMulNBits blocks run along K within one output column, so the packed
weight's blocks are the parts' blocks side by side along N. The judge is the
same as for single weights: the placed blocks dequantize, bit for bit, to the
float weight the pass replaced (the gguf package's dequantizer made those
float weights), and onnxruntime's kernel computes the float product.
"""

from __future__ import annotations

import gguf
import numpy as np
import onnx_ir as ir
import pytest
from builders import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qgraph_passes.pack_matmuls import PackedColumns
from qgraph_passes.quantize import QuantizePass
from test_quantize_gguf import dequantize, random_blocks, write_gguf

import qgraph
from qgraph import io as qio
from qgraph.cli import main as cli_main
from qgraph.gguf_blocks import blocks_from_gguf
from qgraph.quant_blocks import BlockQuantized, concatenate_columns, unpack_matmul_nbits
from qgraph.rewrite.engine import PASS_KEY

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
QTYPES = ["Q4_0", "Q4_1", "Q8_0"]


# --- the arithmetic: the blocks of [A | B] are A's blocks then B's ----------------------------------

@st.composite
def packed_parts(draw):
    """2-3 GGUF tensors of one type and one K (random block bytes), as they would be packed."""
    qtype, k = draw(st.sampled_from(QTYPES)), 32 * draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 9), min_size=2, max_size=3))
    seed = draw(st.integers(0, 2**16))
    raws = [random_blocks(seed + i, qtype, n, k, draw(st.sampled_from([1e-3, 1.0])), draw(st.booleans()))
            for i, n in enumerate(widths)]
    return qtype, k, raws


@SETTINGS
@given(packed_parts())
def test_concatenated_blocks_dequantize_to_the_concatenated_weights_exactly(parts):
    qtype, k, raws = parts
    blocks = [blocks_from_gguf(raw, qtype, k) for raw in raws]
    joined = concatenate_columns(blocks)
    expected = np.concatenate([dequantize(raw, qtype, k).T for raw in raws], axis=1)  # [K, N0 + N1 (+ N2)]
    assert joined.n == expected.shape[1] and joined.k == k
    np.testing.assert_array_equal(joined.dequantize().view(np.uint32), expected.view(np.uint32))


def test_blocks_of_different_layouts_are_refused_naming_what_differs():
    q4_0 = blocks_from_gguf(random_blocks(1, "Q4_0", 3, 64, 1.0, False), "Q4_0", 64)
    q4_1 = blocks_from_gguf(random_blocks(2, "Q4_1", 3, 64, 1.0, False), "Q4_1", 64)
    q8_0 = blocks_from_gguf(random_blocks(3, "Q8_0", 3, 64, 1.0, False), "Q8_0", 64)
    wider = blocks_from_gguf(random_blocks(4, "Q4_0", 3, 96, 1.0, False), "Q4_0", 96)
    with pytest.raises(ValueError, match="part 1 .*zero points"):
        concatenate_columns([q4_0, q4_1])
    with pytest.raises(ValueError, match="part 1 .*bits 4 vs 8"):
        concatenate_columns([q4_0, q8_0])
    with pytest.raises(ValueError, match="part 2 .*K 64 vs 96"):
        concatenate_columns([q4_0, q4_0, wider])


# --- the pass on one packed MatMul ----------------------------------------------------------------

def packed_model(parts: list[np.ndarray], *, saved: bool = False) -> ir.Model:
    """Y = A @ [W0 | W1 | ...] with the packed weight as pack-matmuls leaves it (a PackedColumns initializer),
    or, ``saved``, as a saved and reloaded model holds it (one plain tensor: the parts are no longer known)."""
    tensors = [ir.tensor(np.ascontiguousarray(w), name=f"w{i}") for i, w in enumerate(parts)]
    packed = PackedColumns(tensors)
    if saved:
        packed = ir.tensor(packed.numpy())
    packed.name = "packed"
    k, n = packed.shape[0], packed.shape[1]
    a = ir.val("A", ir.DataType.FLOAT, ir.Shape([3, k]))
    w = ir.Value(name="packed", const_value=packed, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([k, n]))
    node = ir.node("MatMul", [a, w], name="qkv")
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "Y", ir.DataType.FLOAT, ir.Shape([3, n])
    return ir.Model(ir.Graph([a], [y], nodes=[node], initializers=[w], opset_imports={"": 21}), ir_version=10)


def placed_blocks(model: ir.Model, node: ir.Node) -> BlockQuantized:
    """The blocks a MatMulNBits node multiplies by, with the Q4_1 offsets the pass adds beside it."""
    attrs = {name: node.attributes.get_int(name) for name in ("K", "N", "bits", "block_size")}
    inputs = [v.const_value.numpy() if v is not None else None for v in node.inputs[1:4]]
    zeros = inputs[2] if len(inputs) > 2 else None
    q = unpack_matmul_nbits(inputs[0], inputs[1], zeros, k=attrs["K"], n=attrs["N"], bits=attrs["bits"],
                            block_size=attrs["block_size"])
    adds = [u.node for u in node.outputs[0].uses() if u.node.op_type == "Add"]
    if not adds:
        return q
    (add,) = adds
    offsets_matmul = add.inputs[1].producer()
    sums_matmul = offsets_matmul.inputs[0].producer()
    block_sums = sums_matmul.inputs[1].const_value.numpy()  # [K, n_blocks]: row k is 1 in block k // 32 only
    indicator = np.zeros_like(block_sums)
    indicator[np.arange(q.k), np.arange(q.k) // q.block_size] = 1
    np.testing.assert_array_equal(block_sums, indicator)
    return BlockQuantized(q.codes, q.scales, q.zero_points, q.bits, q.block_size, q.k,
                          offsets=offsets_matmul.inputs[1].const_value.numpy().T)


@SETTINGS
@given(packed_parts(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_a_packed_weight_gets_its_parts_gguf_blocks_and_computes_the_float_product(tmp_path_factory, parts, permute,
                                                                                  saved, seed):
    qtype, k, raws = parts
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf",
                      {f"blk.0.w{i}": (raw, qtype) for i, raw in enumerate(raws)})
    rng = np.random.default_rng(seed)
    weights = []  # each part [K, N_i] as the float graph holds it, GGUF rows possibly reordered by the loader
    for raw in raws:
        rows = rng.permutation(raw.shape[0]) if permute else np.arange(raw.shape[0])
        weights.append(dequantize(raw, qtype, k)[rows].T.copy())
    float_weight = np.concatenate(weights, axis=1)
    p = QuantizePass(gguf=str(path), accuracy_level=0)
    model = p(packed_model(weights, saved=saved)).model
    (node,) = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert p.report.rule_matches.get("gguf-packed") == 1
    assert p.report.rule_matches.get(f"gguf-{qtype.lower()}") == len(raws)  # one per GGUF tensor placed
    assert "packed" not in model.graph.initializers  # the float weight is gone
    placed = placed_blocks(model, node)
    np.testing.assert_array_equal(placed.dequantize().view(np.uint32), float_weight.view(np.uint32))
    a = rng.standard_normal((3, k)).astype(np.float32)
    got = run(model, {"A": a})["Y"]
    want = a.astype(np.float64) @ float_weight.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(float_weight).astype(np.float64) + 1e-30
    assert np.all(np.abs(got - want) <= 1e-4 * scale + 1e-6), np.max(np.abs(got - want) / scale)


def test_a_part_the_gguf_does_not_hold_keeps_the_packed_weight_float_and_names_the_part(tmp_path):
    raws = [random_blocks(i, "Q4_1", 4, 64, 1.0, False) for i in range(3)]
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.q": (raws[0], "Q4_1"), "blk.0.v": (raws[2], "Q4_1")})
    weights = [dequantize(raw, "Q4_1", 64).T.copy() for raw in raws]  # w1 (the "k" part) is not in the file
    p = QuantizePass(gguf=str(path))
    model = p(packed_model(weights)).model
    assert not [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert "packed" in model.graph.initializers
    (note,) = [note for note in p.report.notes if "kept packed 'packed'" in note]
    assert "'w1' [64, 4]" in note and "m.gguf" in note and "'w0'" not in note and "'w2'" not in note
    assert p.report.rule_matches.get("gguf-packed-kept-float") == 1


def test_parts_of_different_gguf_types_keep_the_packed_weight_float_and_name_the_types(tmp_path):
    raws = [(random_blocks(1, "Q4_1", 4, 64, 1.0, False), "Q4_1"),
            (random_blocks(2, "Q8_0", 4, 64, 1.0, False), "Q8_0")]
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.q": raws[0], "blk.0.v": raws[1]})
    weights = [dequantize(raw, qtype, 64).T.copy() for raw, qtype in raws]
    p = QuantizePass(gguf=str(path))
    model = p(packed_model(weights)).model
    assert not [n for n in model.graph if n.op_type == "MatMulNBits"]
    (note,) = [note for note in p.report.notes if "kept packed 'packed'" in note]
    assert "different block types" in note and "blk.0.q (Q4_1)" in note and "blk.0.v (Q8_0)" in note


# --- the ort-int4 preset on a tiny Llama whose weights are a GGUF's ------------------------------

def gguf_valued(source, path, *, qtype_of, leave_out: int | None = None) -> ir.Model:
    """The export with every MatMul weight replaced by its GGUF-quantized-and-dequantized value; the GGUF
    (rows in a shuffled order, as llama.cpp reorders q/k) is written to ``path``. ``leave_out``: the index of
    a weight whose tensor is not written (the model keeps its dequantized value)."""
    model = qio.load(source)
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    weights = [v for v in model.graph.initializers.values()
               if v.shape is not None and len(v.shape) == 2 and any(u.node.op_type == "MatMul" for u in v.uses())]
    for i, value in enumerate(weights):
        qtype = gguf.GGMLQuantizationType[qtype_of(i, len(weights))]
        w = value.const_value.numpy()  # [K, N]
        raw = gguf.quants.quantize(np.ascontiguousarray(w.T), qtype)
        exact = gguf.quants.dequantize(raw, qtype).reshape(w.shape[1], w.shape[0])
        value.const_value = ir.tensor(np.ascontiguousarray(exact.T), name=value.name)
        if i != leave_out:
            writer.add_tensor(f"blk.{i}.weight", raw[rng.permutation(raw.shape[0])], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _q4_1_with_a_q8_0_head(i: int, count: int) -> str:
    return "Q8_0" if i == count - 1 else "Q4_1"  # the LM head comes last in the export


def _float_product_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Node name -> weight of every MatMul with a constant 2-D weight (packed ones concatenated)."""
    return {n.name: n.inputs[1].const_value.numpy() for n in model.graph
            if n.op_type == "MatMul" and n.inputs[1].const_value is not None and len(n.inputs[1].shape) == 2}


@pytest.mark.slow
def test_ort_int4_with_a_gguf_places_blocks_on_every_packed_weight_exactly(tiny_zoo, tmp_path):
    source = tiny_zoo.export("llama", "dynamo").model_path
    path = tmp_path / "tiny.gguf"
    model = gguf_valued(source, path, qtype_of=_q4_1_with_a_q8_0_head)
    # The float graph of the same weights (the GGUF's, dequantized), through the same pipeline in fp32.
    float_graph = qgraph.optimize(gguf_valued(source, tmp_path / "same.gguf", qtype_of=_q4_1_with_a_q8_0_head),
                                  preset="ort")
    float_weights = _float_product_weights(float_graph)
    quantized, report = qgraph.optimize_with_report(model, preset="ort-int4",
                                                    options={"quantize": {"gguf": str(path), "accuracy_level": 0}})
    (record,) = [r for r in report.passes if r.name == "quantize"]
    # per layer: packed q|k|v, o, packed gate|up, down; and the LM head
    assert record.rule_matches.get("gguf-packed") == 2 * 2
    assert record.rule_matches.get("gguf-q4_1") == 2 * 7 and record.rule_matches.get("gguf-q8_0") == 1
    nbits = [n for n in quantized.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1
    # No float product by a weight is left but the small Q4_1 offset helpers the pass adds beside.
    left = [n.name for n in quantized.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
            and n.metadata_props.get(PASS_KEY) != "quantize"]
    assert not left
    assert sorted(n.name.removesuffix(f"/q{n.attributes.get_int('bits')}") for n in nbits) == sorted(float_weights)
    for node in nbits:
        weight = float_weights[node.name.removesuffix(f"/q{node.attributes.get_int('bits')}")]
        placed = placed_blocks(quantized, node).dequantize()
        np.testing.assert_array_equal(placed.view(np.uint32), weight.view(np.uint32), err_msg=node.name)


@pytest.mark.slow
def test_ort_int4_with_a_gguf_verifies_within_its_budget(tiny_zoo, tmp_path, capsys):
    source = tiny_zoo.export("llama", "dynamo").model_path
    path = tmp_path / "tiny.gguf"
    model_path = tmp_path / "gguf-valued.onnx"
    qio.save(gguf_valued(source, path, qtype_of=_q4_1_with_a_q8_0_head), model_path)
    out = tmp_path / "int4.onnx"
    code = cli_main(["optimize", str(model_path), "-o", str(out), "--preset", "ort-int4", "--verify",
                     "--option", f"quantize.gguf={path}", "--option", "quantize.accuracy_level=0"])
    assert code == 0, capsys.readouterr().err
    assert sum(n.op_type == "MatMulNBits" for n in qio.load(out).graph) == 2 * 4 + 1


@pytest.mark.slow
def test_ort_int4_reports_the_packed_weight_whose_part_is_missing_and_keeps_it_float(tiny_zoo, tmp_path):
    source = tiny_zoo.export("llama", "dynamo").model_path
    path = tmp_path / "tiny.gguf"
    model = gguf_valued(source, path, qtype_of=_q4_1_with_a_q8_0_head, leave_out=1)  # layer 0's k_proj
    quantized, report = qgraph.optimize_with_report(model, preset="ort-int4", options={"quantize": {"gguf": str(path)}})
    (record,) = [r for r in report.passes if r.name == "quantize"]
    assert record.rule_matches.get("gguf-packed") == 2 * 2 - 1
    assert record.rule_matches.get("gguf-packed-kept-float") == 1
    (note,) = [note for note in record.notes if note.startswith("kept packed")]
    assert "tiny.gguf" in note and "[64, 32]" in note  # the k part: 2 kv heads of 16
    assert sum(n.op_type == "MatMulNBits" for n in quantized.graph) == 2 * 4


@pytest.mark.slow
def test_a_packed_graph_saved_and_loaded_again_still_gets_the_gguf_blocks(tiny_zoo, tmp_path):
    """Saved, a packed weight is one plain tensor: its columns are found as GGUF tensors side by side."""
    source = tiny_zoo.export("llama", "dynamo").model_path
    path = tmp_path / "tiny.gguf"
    qio.save(qgraph.optimize(gguf_valued(source, path, qtype_of=_q4_1_with_a_q8_0_head), preset="ort"),
             tmp_path / "ort.onnx")
    float_weights = _float_product_weights(qio.load(tmp_path / "ort.onnx"))
    p = QuantizePass(gguf=str(path))
    quantized = p(qio.load(tmp_path / "ort.onnx")).model
    assert p.report.rule_matches.get("gguf-packed") == 2 * 2
    nbits = [n for n in quantized.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1
    for node in nbits:
        weight = float_weights[node.name.removesuffix(f"/q{node.attributes.get_int('bits')}")]
        placed = placed_blocks(quantized, node).dequantize()
        np.testing.assert_array_equal(placed.view(np.uint32), weight.view(np.uint32), err_msg=node.name)

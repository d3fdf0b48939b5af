"""lower-gqa: each layer's Split + RotaryEmbedding + Attention becomes one com.microsoft::GroupQueryAttention.

The meaning kept is the cached graph's own (``meaning = "sequence"``): the
lowered graph, replayed on drawn token sequences in drawn splits, gives the
logits of the concat graph it came from -- with ``mask=bias`` (the default)
on padded batches of several rows, with ``mask=none`` on the domain it then
declares (batch 1, all-ones masks), which the replay reads from the graph. A lowering broken
on purpose (rotation dropped, the sliding window dropped, the wrong number of
KV heads) fails ``qgraph optimize --verify`` with exit code 1; layers that
cannot be lowered are named in the report with the check that failed.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from qgraph_passes.gqa_lowering import FALLBACK_POSITIONS
from qgraph_passes.gqa_probes import causal_window, rotary_cache
from qgraph_passes.position_bound import declared_max_positions

from qgraph import io
from qgraph.cli import main
from qgraph.demo import run_preset
from qgraph.errors import BadInputError
from qgraph.export.zoo import POSITIONS
from qgraph.manager import PassManager
from qgraph.registry import default_registry
from qgraph.verify.kv_contract import MASKS_KEY, MAX_POSITIONS_KEY, detect_kv_layout
from qgraph.verify.sequence import SequenceReplayer, ReplayCase, check_sequence_equivalence

ZOO = [(arch, exporter) for arch in ("llama", "mistral", "qwen2", "qwen3") for exporter in ("dynamo", "torchscript")]
# llama, mistral: packed QKV (one MatMul + Split); qwen2: biased q/k/v projections left apart by pack-matmuls;
# qwen3: q and k normalized per head before the rotation (attention-io packs the norms' outputs), so apart too.
# TorchScript's heads split reaches attention-io in the same form once shape-reads has made its run-time
# Reshape targets constants.
# Phi-3: its packed qkv_proj is sliced (not Split) into q, k, v, which go in apart. TorchScript rotates a
# slice of each head as wide as the cos table, and keeps the rest: the whole head and an empty rest here,
# which shape-reads proves (a whole Slice, an empty Concat operand), so the rotation reaches the heads.
PHI3 = [("phi3", "dynamo"), ("phi3", "torchscript")]
# Falcon: multi-query (one K/V head, kv_num_heads 1) cut out of one fused projection by a split of the heads
# axis; attention-io reads q, k, v as heads of its columns. They go in apart: the projection is packed with
# the parallel MLP's, so its Split has a fourth part.
MULTI_QUERY = [("falcon", "dynamo"), ("falcon", "torchscript")]
APART = {"qwen2", "qwen3", "phi3", "falcon"}
LOWERED = [*ZOO, *PHI3, *MULTI_QUERY]
# partial rotary the kernel turns itself: Phi's 16 of 32 channels, GPT-J's 16 of 32 in interleaved pairs
# (rotated as [B, S, H, D] before the heads move in front; attention-io packs the rotations all the same)
PARTIAL_IN_KERNEL = [("phi", "dynamo"), ("phi", "torchscript"), ("gptj", "dynamo"), ("gptj", "torchscript")]
# partial rotary it cannot (StableLM and GPT-NeoX: 4 of 16 channels; onnxruntime's CPU kernel turns a multiple
# of 16): the RotaryEmbedding nodes stay in front of it and q, k, v go in apart. GPT-NeoX's fused projection
# holds each head's q, k and v side by side; attention-io reorders its columns to [Q | K | V] in the weights.
KEPT_ROTARY = [("stablelm", "torchscript"), ("gpt_neox", "dynamo"), ("gpt_neox", "torchscript")]
# learned positions, no rotation at all. GPT-2, OPT and GPT-Neo: plain multi-head attention (kv_num_heads ==
# num_heads); GPT-2's Conv1D merges the heads straight into Gemm rows ([-1, H*D]); OPT and GPT-Neo project them
# with a MatMul. TorchScript computes every head split's target at run time ([B, S, -1, D] of a Split's part;
# GPT-2 views the ids as [-1, S] first): dim_sources proves them. GPT-Neo alternates a global and a local
# (sliding window of 4) layer; its dynamo export merges the global layer's heads into [B, Min(128, S), H*D],
# a Reshape that stays after the kernel's packed output. GPT-BigCode is multi-query, its one K/V head's
# columns after the query's in one fused projection.
NO_ROTARY = [(arch, exporter) for arch in ("gpt2", "opt", "gpt_neo", "gpt_bigcode")
             for exporter in ("dynamo", "torchscript")]
# the layers attention-io reads as heads of a fused projection's columns (cut out some other way)
FUSED_QKV = [*MULTI_QUERY, ("gpt_neox", "dynamo"), ("gpt_neox", "torchscript"), ("gpt_bigcode", "dynamo"),
             ("gpt_bigcode", "torchscript")]
# ALiBi: the mask adds slope_h * key position to head h's scores (a float [B, H, S, T] mask). The kernel has no
# ALiBi of its own, so only mask=bias, which passes the mask in whole as attention_bias, lowers it.
ALIBI = [("bloom", "dynamo"), ("bloom", "torchscript")]


@pytest.fixture(scope="module")
def ort_graphs(tiny_zoo, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """The ort-attention preset's graph of each case (what lower-gqa takes), made once for the module."""
    out = tmp_path_factory.mktemp("ort-graphs")
    graphs = {}
    for arch, exporter in [*LOWERED, *PARTIAL_IN_KERNEL, *KEPT_ROTARY, *NO_ROTARY, *ALIBI]:
        run = run_preset("ort-attention", tiny_zoo.export(arch, exporter).output_dir, out / f"{arch}-{exporter}",
                         default_registry())
        graphs[(arch, exporter)] = run.folder / "model.onnx"
    return graphs


def _lower(path: Path, **options) -> tuple[ir.Model, object]:
    model = io.load(path)
    report = PassManager([("lower-gqa", options) if options else "lower-gqa"]).run(model)
    return model, report


def _gqa_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if (n.domain, n.op_type) == ("com.microsoft", "GroupQueryAttention")]


@pytest.mark.parametrize("mask", ["bias", "none"])
@pytest.mark.parametrize(("arch", "exporter"), LOWERED)
def test_lowered_graph_replays_the_concat_graph(ort_graphs, arch, exporter, mask) -> None:
    source = ort_graphs[(arch, exporter)]
    model, _ = _lower(source, mask=mask)
    gqa = _gqa_nodes(model)
    assert len(gqa) == 2  # the zoo's two layers, each one node
    assert not [n for n in model.graph if n.op_type in ("Attention", "RotaryEmbedding")]
    assert all(n.attributes["do_rotary"].value == 1 for n in gqa)
    if arch in APART:  # q, k, v apart: GroupQueryAttention's unpacked form
        assert all(n.inputs[1] is not None and n.inputs[2] is not None for n in gqa)
    else:  # the packed projection whole, its Split gone
        assert all(n.inputs[0].producer().op_type == "MatMul" and n.inputs[1] is None for n in gqa)
    if arch == "falcon":  # multi-query: one K/V head for the 4 query heads
        assert all((n.attributes["num_heads"].value, n.attributes["kv_num_heads"].value) == (4, 1) for n in gqa)
    if arch == "mistral":  # the tiny config's sliding_window=4, read from the probed mask
        assert {n.attributes["local_window_size"].value for n in gqa} == {4}
    else:
        assert all("local_window_size" not in n.attributes for n in gqa)
    biases = [n.inputs[10] for n in gqa if len(n.inputs) > 10]
    if mask == "bias":  # the graph's own mask as attention_bias, one for all layers; the batch stays symbolic
        assert len(biases) == 2 and biases[0] is biases[1] and not isinstance(model.graph.inputs[0].shape[0], int)
    else:
        assert not biases and model.graph.inputs[0].shape[0] == 1
    result = check_sequence_equivalence(model, source, examples=15, seed=1, max_len=12)
    assert result.equivalent, str(result)
    if mask == "bias":  # the draw had padded batches of several rows
        assert MASKS_KEY not in model.metadata_props


@pytest.mark.parametrize("mask", ["bias", "none"])
@pytest.mark.parametrize(("arch", "exporter"), FUSED_QKV)
def test_heads_cut_from_a_fused_projection_are_lowered_and_replay_the_export(tiny_zoo, ort_graphs, arch, exporter,
                                                                             mask) -> None:
    """Falcon, GPT-BigCode (multi-query) and GPT-NeoX (q, k, v side by side per head): every layer is lowered, no
    column reorder is left as a Gather (GPT-NeoX's is in the weights), and the lowered graph replays the
    no-cache export the whole preset started from."""
    model, _ = _lower(ort_graphs[(arch, exporter)], mask=mask)
    gqa = _gqa_nodes(model)
    assert len(gqa) == 2 and not [n for n in model.graph if n.op_type == "Attention"]
    assert {n.attributes["kv_num_heads"].value for n in gqa} == ({4} if arch == "gpt_neox" else {1})
    # a Gather of computed activations would be a column reorder left in the graph (table lookups and shapes aside)
    assert not [n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value is None
                and n.inputs[0].dtype == ir.DataType.FLOAT]
    result = check_sequence_equivalence(model, tiny_zoo.export(arch, exporter).model_path, examples=10, seed=5,
                                        max_len=12)
    assert result.equivalent, str(result)


def test_the_graph_declares_its_narrower_domain(ort_graphs) -> None:
    source = ort_graphs[("llama", "dynamo")]
    model, _ = _lower(source, max_positions=64, mask="none")
    for value in [*model.graph.inputs, *model.graph.outputs]:
        assert value.shape[0] == 1, value.name
    layout = detect_kv_layout(model)
    assert layout.batch == 1 and layout.masks_all_ones and layout.max_positions == 64
    assert model.metadata_props[MASKS_KEY] == "all-ones" and model.metadata_props[MAX_POSITIONS_KEY] == "64"
    cos = next(v for v in model.graph.initializers.values() if v.name.startswith("lower_gqa/cos_cache"))
    assert cos.const_value.shape[0] == 64
    with SequenceReplayer(model, source) as replayer:
        padded = ReplayCase(np.array([[5, 6, 7]]), np.array([[False, True, True]]), (3,), "left")
        with pytest.raises(BadInputError, match="unpadded"):
            replayer.run(padded)
        too_long = ReplayCase(np.ones((1, 65), np.int64), np.ones((1, 65), bool), (65,))
        with pytest.raises(BadInputError, match="at most 64 positions"):
            replayer.run(too_long)


def test_rotary_caches_are_the_graphs_own_tables(ort_graphs) -> None:
    """Row p of the caches is what the graph's table subgraph computes for position p."""
    source = ort_graphs[("llama", "dynamo")]
    before = io.load(source)
    rot = next(n for n in before.graph if n.op_type == "RotaryEmbedding")
    cache = rotary_cache(before, rot.inputs[1], rot.inputs[2], 32)
    assert not isinstance(cache, str), cache
    config_theta, d = 10000.0, 16  # the tiny llama's rope: theta 1e4, head_dim 16
    angles = np.arange(32)[:, None] * (1.0 / config_theta ** (np.arange(0, d, 2) / d))[None]
    np.testing.assert_allclose(cache[0], np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(cache[1], np.sin(angles), atol=1e-6)


def test_a_length_dependent_table_is_refused(ort_graphs) -> None:
    """A table that reads the sequence length (dynamic NTK scaling's shape) is not one row per position."""
    model = io.load(ort_graphs[("llama", "dynamo")])
    rot = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    cos = rot.inputs[1]
    # cos * (S / 1): the same rows for every length only if S does not enter -- here it does
    positions = next(v for v in model.graph.inputs if v.name == "position_ids")
    length = ir.node("Shape", [positions], attributes={"start": 1, "end": 2})
    as_float = ir.node("Cast", [length.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    scaled = ir.node("Mul", [cos, as_float.outputs[0]])
    model.graph.insert_after(cos.producer(), [length, as_float, scaled])
    reason = rotary_cache(model, scaled.outputs[0], rot.inputs[2], 16)
    assert isinstance(reason, str) and "sequence length" in reason


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    model.graph.register_initializer(value)
    return value


def test_a_table_of_the_first_row_only_is_refused(ort_graphs) -> None:
    """Row 0's angles broadcast to the batch: right for batch 1, wrong for every other row -- probed on two rows."""
    model = io.load(ort_graphs[("llama", "dynamo")])
    rot = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    cos = rot.inputs[1]
    zero, one = _initializer(model, "t/zero", np.array([0])), _initializer(model, "t/one", np.array([1]))
    first = ir.node("Slice", [cos, zero, one, zero])
    shape = ir.node("Shape", [cos])
    broadcast = ir.node("Expand", [first.outputs[0], shape.outputs[0]])
    model.graph.insert_after(cos.producer(), [first, shape, broadcast])
    assert not isinstance(rotary_cache(model, cos, rot.inputs[2], 16), str)  # the graph's own table: per row
    reason = rotary_cache(model, broadcast.outputs[0], rot.inputs[2], 16)
    assert isinstance(reason, str) and "each row's own position" in reason


def _cache_rows(model: ir.Model) -> int:
    cos = next(v for v in model.graph.initializers.values() if v.name.startswith("lower_gqa/cos_cache"))
    return cos.const_value.shape[0]


def test_the_caches_cover_the_models_own_positions(ort_graphs, tmp_path) -> None:
    """max_positions: the config.json beside the model, the fallback without one, or the option."""
    source = ort_graphs[("llama", "dynamo")]
    assert json.loads((source.parent / "config.json").read_text())["max_position_embeddings"] == POSITIONS
    model, report = _lower(source)
    assert _cache_rows(model) == POSITIONS and model.metadata_props[MAX_POSITIONS_KEY] == str(POSITIONS)
    notes = next(r for r in report.passes if r.name == "lower-gqa").notes
    assert any(f"{POSITIONS} positions (max_position_embeddings in" in note for note in notes), notes
    assert _cache_rows(_lower(source, max_positions=48)[0]) == 48  # the option still decides when given
    alone = tmp_path / "alone"  # the same graph without its config.json: no bound declared
    shutil.copytree(source.parent, alone)
    (alone / "config.json").unlink()
    model, report = _lower(alone / "model.onnx")
    assert _cache_rows(model) == FALLBACK_POSITIONS
    notes = next(r for r in report.passes if r.name == "lower-gqa").notes
    assert any("the model declares no bound" in note for note in notes), notes
    relowered = tmp_path / "relowered.onnx"  # a bound already in the graph's metadata wins
    io.save(_lower(source, max_positions=40)[0], relowered)
    assert declared_max_positions(io.load(relowered)) == (40, f"metadata {MAX_POSITIONS_KEY}")


def test_a_mask_that_is_not_causal_is_refused(ort_graphs) -> None:
    model = io.load(ort_graphs[("llama", "dynamo")])
    attention = next(n for n in model.graph if n.op_type == "Attention")
    mask = attention.inputs[3]
    assert causal_window(model, mask) is None  # causal, no window
    # every key visible: what an encoder's (bidirectional) mask shows
    everything = ir.node("Or", [mask, ir.node("Not", [mask]).outputs[0]])
    model.graph.insert_after(mask.producer(), [everything.inputs[1].producer(), everything])
    reason = causal_window(model, everything.outputs[0])
    assert isinstance(reason, str) and "not a causal padding mask" in reason


def _softcapped(model: ir.Model, cap: float = 0.05) -> None:
    """Soft-capped scores, as Gemma 2's. The tiny models' scores are ~0.1, so a cap of 0.05 bends every one
    of them (Gemma 2's own cap of 50 would leave them as they are, to float precision)."""
    for node in model.graph:
        if node.op_type == "Attention":
            node.attributes["softcap"] = ir.AttrFloat32("softcap", cap)


def _qk_output_mode(model: ir.Model) -> None:
    """A qk_matmul_output_mode asks for the scores at some stage; the kernel has no such output."""
    for node in model.graph:
        if node.op_type == "Attention":
            node.attributes["qk_matmul_output_mode"] = ir.AttrInt64("qk_matmul_output_mode", 1)


def _interleaved(model: ir.Model) -> None:
    """The rotations made GPT-J style: pairs (x0, x1), (x2, x3), ... turn together."""
    for node in model.graph:
        if node.op_type == "RotaryEmbedding":
            node.attributes["interleaved"] = ir.AttrInt64("interleaved", 1)


def _q_interleaved(model: ir.Model) -> None:
    """Only q's rotations interleaved: k is turned otherwise, which one kernel attribute cannot say."""
    for node in model.graph:
        if node.op_type == "Attention":
            rotary = node.inputs[0].producer()
            rotary.attributes["interleaved"] = ir.AttrInt64("interleaved", 1)


def _changed(source: Path, change, tmp_path: Path) -> Path:
    """The concat graph with ``change`` made, saved: the reference of a lowering of the changed graph."""
    changed = io.load(source)
    change(changed)
    path = tmp_path / "concat" / "model.onnx"
    path.parent.mkdir()
    io.save(changed, path)
    return path


def _assert_replays(model: ir.Model, source: Path, export: Path | None) -> None:
    """The lowered graph replays the concat graph it came from and, when given, the model's no-cache export."""
    result = check_sequence_equivalence(model, source, examples=12, seed=2, max_len=10)
    assert result.equivalent, str(result)
    if export is not None:
        result = check_sequence_equivalence(model, export, examples=6, seed=3, max_len=10)
        assert result.equivalent, str(result)


@pytest.mark.parametrize("mask", ["bias", "none"])
@pytest.mark.parametrize(("arch", "exporter", "change"), [
    *((arch, exporter, None) for arch, exporter in PARTIAL_IN_KERNEL),
    ("llama", "dynamo", _interleaved),  # whole heads in pairs
])
def test_partial_and_interleaved_rotations_go_into_the_kernel(ort_graphs, tiny_zoo, tmp_path, arch, exporter, change,
                                                               mask) -> None:
    """A rotation of the first 16 channels of each head (Phi), in interleaved pairs (GPT-J), or of whole heads in
    pairs (llama changed): the kernel turns them (do_rotary, rotary_interleaved as the rotations are, a cos
    cache half as wide as the channels turned) and no RotaryEmbedding is left; the graph replays the concat
    graph, and a model's own rotations the no-cache export too. The interleaved llama differs from the llama it
    was made from, so a kernel that turned halves would fail its replay."""
    source = ort_graphs[(arch, exporter)]
    if change is not None:
        changed = _changed(source, change, tmp_path)
        assert not check_sequence_equivalence(changed, source, examples=3, seed=0, max_len=8).equivalent
        source = changed
    rotated = {n.attributes["rotary_embedding_dim"].value if "rotary_embedding_dim" in n.attributes else 0
               for n in io.load(source).graph if n.op_type == "RotaryEmbedding"}
    model, report = _lower(source, mask=mask)
    gqa = _gqa_nodes(model)
    assert len(gqa) == 2 and not [n for n in model.graph if n.op_type in ("Attention", "RotaryEmbedding")]
    head_dim = next(v for v in model.graph.inputs if v.name.startswith("past_key_values.")).shape[3]
    turned = {2 * n.inputs[7].shape[1] for n in gqa}
    assert rotated == ({16} if arch in ("phi", "gptj") else {0}) and turned == {16 if arch != "llama" else head_dim}
    assert arch == "llama" or head_dim == 32  # partial: 16 of 32
    interleaved = arch == "gptj" or change is _interleaved
    assert all(n.attributes["do_rotary"].value == 1 for n in gqa)
    assert all(("rotary_interleaved" in n.attributes and n.attributes["rotary_interleaved"].value == 1) == interleaved
               for n in gqa)
    record = next(r for r in report.passes if r.name == "lower-gqa")
    assert not [n for n in record.notes if "kept as RotaryEmbedding" in n]
    _assert_replays(model, source, tiny_zoo.export(arch, exporter).model_path if change is None else None)


@pytest.mark.parametrize(("arch", "exporter", "change", "mask", "why"), [
    ("llama", "torchscript", _qk_output_mode, "bias", "a qk_matmul_output_mode is set"),
    # Bloom's mask carries ALiBi: without the bias input nothing would add it
    ("bloom", "dynamo", None, "none", "adds a key-position bias (ALiBi), which mask=none leaves out"),
    ("bloom", "torchscript", None, "none", "adds a key-position bias (ALiBi), which mask=none leaves out"),
])
def test_layers_not_lowered_are_reported(ort_graphs, arch, exporter, change, mask, why) -> None:
    model = io.load(ort_graphs[(arch, exporter)])
    if change is not None:
        change(model)
    report = PassManager([("lower-gqa", {"mask": mask})]).run(model)
    record = next(r for r in report.passes if r.name == "lower-gqa")
    assert not record.changed and not _gqa_nodes(model)
    notes = [n for n in record.notes if "not lowered" in n]
    attentions = [n.name for n in model.graph if n.op_type == "Attention"]
    assert len(notes) == len(attentions) == 2
    assert all(why in note for note in notes) and all(any(a in note for note in notes) for a in attentions)
    assert record.near_misses["group-query-attention"]["candidates"] == 2  # the table's "near miss" line
    assert MASKS_KEY not in model.metadata_props  # nothing lowered: the graph keeps its whole domain


@pytest.mark.parametrize("mask", ["bias", "none"])
@pytest.mark.parametrize(("arch", "exporter"), [("llama", "torchscript"), ("mistral", "dynamo")])
def test_a_softcap_goes_into_the_kernel(ort_graphs, tmp_path, arch, exporter, mask) -> None:
    """Soft-capped layers (Gemma 2) are lowered with the kernel's softcap (Mistral: with its sliding window too),
    and replay the soft-capped concat graph; the cap is large enough to change the logits, so a lowering
    that dropped it would not."""
    source = tmp_path / "softcapped.onnx"
    model = io.load(ort_graphs[(arch, exporter)])
    _softcapped(model)
    io.save(model, source)
    uncapped = check_sequence_equivalence(io.load(ort_graphs[(arch, exporter)]), source, examples=3, seed=0,
                                          max_len=8)
    assert not uncapped.equivalent  # the cap changes what the graph computes
    lowered, _ = _lower(source, mask=mask)
    gqa = _gqa_nodes(lowered)
    assert len(gqa) == 2 and not [n for n in lowered.graph if n.op_type == "Attention"]
    assert all(n.attributes["softcap"].value == pytest.approx(0.05) for n in gqa)
    result = check_sequence_equivalence(lowered, source, examples=10, seed=1, max_len=12)
    assert result.equivalent, str(result)


@pytest.mark.parametrize("mask", ["bias", "none"])
@pytest.mark.parametrize(("arch", "exporter", "change", "why"), [
    *((arch, exporter, None, "partial rotary (rotary_embedding_dim 4 of 16)") for arch, exporter in KEPT_ROTARY),
    ("llama", "dynamo", _q_interleaved, "q and k are rotated differently"),
])
def test_a_rotation_the_kernel_cannot_take_stays_in_front_of_it(ort_graphs, tiny_zoo, tmp_path, arch, exporter,
                                                                 change, why, mask) -> None:
    """Rotations the kernel cannot take (4 of 16 channels; q and k turned differently): each layer is lowered
    with do_rotary off, its two RotaryEmbedding nodes
    kept and feeding the kernel q and k apart, the reason in the report; the graph replays the concat graph,
    and a model's own rotations the no-cache export too (the concat graph's rotations are attention-io's)."""
    source = ort_graphs[(arch, exporter)]
    if change is not None:  # the concat graph with the change is the reference
        source = _changed(source, change, tmp_path)
    model, report = _lower(source, mask=mask)
    gqa = _gqa_nodes(model)
    assert len(gqa) == 2 and not [n for n in model.graph if n.op_type == "Attention"]
    for node in gqa:
        assert "do_rotary" not in node.attributes or node.attributes["do_rotary"].value == 0
        assert [node.inputs[i].producer().op_type for i in (0, 1)] == ["RotaryEmbedding"] * 2
        assert node.inputs[2] is not None and node.inputs[2].producer().op_type != "RotaryEmbedding"
    record = next(r for r in report.passes if r.name == "lower-gqa")
    kept = [n for n in record.notes if "kept as RotaryEmbedding" in n]
    assert len(kept) == 2 and all(why in n for n in kept)
    _assert_replays(model, source, tiny_zoo.export(arch, exporter).model_path if change is None else None)


@pytest.mark.parametrize(("arch", "exporter"), ALIBI)
def test_alibi_goes_into_the_kernel_as_its_bias(ort_graphs, tiny_zoo, arch, exporter) -> None:
    """Bloom (mask=bias): every layer one GroupQueryAttention whose attention_bias is the layer's own float
    [B, H, S, T] mask, ALiBi's per-head slopes and all, and the lowered graph gives the concat graph's and the
    no-cache export's logits on padded batches, prefill, chunks and decode steps."""
    source = ort_graphs[(arch, exporter)]
    masks = {n.inputs[3].name for n in io.load(source).graph if n.op_type == "Attention"}
    model, _ = _lower(source)
    gqa = _gqa_nodes(model)
    assert len(gqa) == 2 and not [n for n in model.graph if n.op_type == "Attention"]
    assert {n.inputs[10].name for n in gqa} == masks  # attention_bias: the mask itself, no Where around it
    for node in gqa:
        assert node.attributes["num_heads"].value == node.attributes["kv_num_heads"].value == 4
    result = check_sequence_equivalence(model, source, examples=12, seed=4, max_len=10)
    assert result.equivalent, str(result)
    export = tiny_zoo.export(arch, exporter).model_path
    result = check_sequence_equivalence(model, export, examples=8, seed=5, max_len=10)
    assert result.equivalent, str(result)


@pytest.mark.parametrize("mask", ["bias", "none"])
@pytest.mark.parametrize(("arch", "exporter"), NO_ROTARY)
def test_a_decoder_without_rotary_is_lowered_and_replays(ort_graphs, arch, exporter, mask) -> None:
    """GPT-2, OPT, GPT-Neo: no rotation to take in (do_rotary off, no caches), as many KV heads as query heads;
    every layer is one kernel, no head transpose is left, and its [B, S, H*D] output reaches the output
    projection (through at most the model's own Reshape: GPT-2's rows, GPT-Neo's dynamo merge). GPT-Neo's
    local layer keeps its window of 4."""
    source = ort_graphs[(arch, exporter)]
    model, _ = _lower(source, mask=mask)
    gqa = _gqa_nodes(model)
    assert len(gqa) == 2 and not [n for n in model.graph if n.op_type in ("Attention", "RotaryEmbedding")]
    assert not [n for n in model.graph if n.op_type == "Transpose" and len(n.attributes["perm"].value) == 4]
    for node in gqa:
        assert "do_rotary" not in node.attributes and (len(node.inputs) < 8 or node.inputs[7] is None)  # no caches
        kv_heads = 1 if arch == "gpt_bigcode" else 4  # multi-query: one K/V head
        assert node.attributes["num_heads"].value == 4 and node.attributes["kv_num_heads"].value == kv_heads
        (use,) = [u.node for u in node.outputs[0].uses()]
        if use.op_type == "Reshape":
            (use,) = [u.node for u in use.outputs[0].uses()]
        assert use.op_type in ("MatMul", "Gemm")
    windows = [n.attributes["local_window_size"].value if "local_window_size" in n.attributes else None for n in gqa]
    assert windows == ([None, 4] if arch == "gpt_neo" else [None, None])
    result = check_sequence_equivalence(model, source, examples=12, seed=4, max_len=10)
    assert result.equivalent, str(result)


_BROKEN = """
from qgraph_passes.gqa_lowering import LowerGQAPass


class BrokenGQA(LowerGQAPass):
    '''lower-gqa with one thing wrong on purpose (tests only).'''

    name = "{name}"

    def call(self, model):
        result = super().call(model)
        for node in model.graph:
            if node.op_type == "GroupQueryAttention":
                {mutation}
        return result
"""

MUTATIONS = {  # (arch, the change, the lowering's mask option)
    "rotary off": ("llama", 'node.attributes.pop("do_rotary")', "bias"),
    "bias dropped": ("llama", "node.replace_input_with(10, None)", "bias"),  # padded rows then see their padding
    # with mask=bias the window is in the bias too; without it, local_window_size alone keeps it
    "window dropped": ("mistral", 'node.attributes.pop("local_window_size")', "none"),
    "wrong kv_num_heads": ("llama", 'node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", 1)', "bias"),
    "interleaving dropped": ("gptj", 'node.attributes.pop("rotary_interleaved")', "bias"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_verify_fails_on_a_broken_lowering(ort_graphs, tmp_path, mutation) -> None:
    arch, code, mask = MUTATIONS[mutation]
    plugin = tmp_path / "broken.py"
    name = "lower-gqa-" + mutation.replace(" ", "-")  # plugin pass names are process-wide: one per mutation
    plugin.write_text("import onnx_ir as ir\n" + textwrap.dedent(_BROKEN).replace("{mutation}", code).replace("{name}", name))
    source = ort_graphs[(arch, "dynamo")]
    args = [str(source), "--plugin", str(plugin), "--verify", "--passes"]
    assert main(["optimize", "-o", str(tmp_path / "good.onnx"), *args, "lower-gqa", "--option", f"lower-gqa.mask={mask}"]) == 0
    assert main(["optimize", "-o", str(tmp_path / "broken.onnx"), *args, name, "--option", f"{name}.mask={mask}"]) == 1
    assert not (tmp_path / "broken.onnx").exists()


def test_lowering_composes_with_quantize(tiny_zoo, tmp_path) -> None:
    """ort-int4: GroupQueryAttention reads the packed projection's MatMulNBits; the ort-int4-attention graph's logits."""
    export_dir = tiny_zoo.export("llama", "dynamo").output_dir
    plain = run_preset("ort-int4-attention", export_dir, tmp_path, default_registry())
    lowered = run_preset("ort-int4", export_dir, tmp_path, default_registry())
    model = io.load(lowered.folder / "model.onnx")
    gqa = _gqa_nodes(model)
    assert len(gqa) == 2 and all(n.inputs[0].producer().op_type == "MatMulNBits" for n in gqa)
    result = check_sequence_equivalence(model, plain.folder / "model.onnx", examples=10, seed=2)
    assert result.equivalent, str(result)


@pytest.mark.parametrize(("arch", "exporter"), [*ZOO, *PARTIAL_IN_KERNEL, *FUSED_QKV])
def test_optimize_verify_passes_on_the_zoo(ort_graphs, tmp_path, capsys, arch, exporter) -> None:
    """``qgraph optimize --passes lower-gqa --verify``: every layer lowered and replayed, both exporters (Phi's
    and GPT-J's with their partial rotations in the kernel)."""
    out = tmp_path / "gqa.onnx"
    assert main(["optimize", str(ort_graphs[(arch, exporter)]), "-o", str(out), "--passes", "lower-gqa", "--verify"]) == 0
    table = capsys.readouterr().out
    lowered = _gqa_nodes(io.load(out))
    assert (arch, exporter) in [*LOWERED, *PARTIAL_IN_KERNEL, *KEPT_ROTARY, *NO_ROTARY]
    assert len(lowered) == 2 and "cached replay gives the logits of the input's own cache" in table
    assert "near miss in lower-gqa" not in table


def test_a_pass_after_the_kv_cache_is_verified_by_replay(ort_graphs, tmp_path, capsys) -> None:
    """A cache graph's inputs are tied (mask = past + new columns): --verify replays generations, never draws them apart."""
    source = ort_graphs[("llama", "dynamo")]
    out = tmp_path / "sorted.onnx"
    assert main(["optimize", str(source), "-o", str(out), "--passes", "lower-gqa", "skip-rmsnorm", "cse", "--verify"]) == 0
    table = capsys.readouterr().out
    verified = [line for line in table.splitlines() if line.startswith(("lower-gqa", "cse"))]
    assert verified and all("cached replay gives the logits of the input's own cache" in line
                            or line.rstrip().endswith("-") for line in verified), table
    assert "drawn inputs" not in table, table

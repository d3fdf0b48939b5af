"""The kv-cache pass on hand-built canonical decoders: mask spellings, refusals, CtxScatter, device files.

The zoo shows the spellings of two exporters; ``kv_cache_graphs`` adds the
ones it lacks (additive float masks with soft-capping, ``is_causal``
without a mask, a window of 3) and the graphs the pass must refuse rather
than guess at.
"""

from __future__ import annotations

import json
from pathlib import Path

import kv_cache_graphs as graphs
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from qgraph_passes.kv_cache import KVCachePass
from qgraph_passes.kv_cache.ctx_ops import ctx_scatter_function

from qgraph import io as qio
from qgraph.cli import main as cli_main
from qgraph.custom_ops import attach_function
from qgraph.errors import BadInputError, PassFailure
from qgraph.verify.sequence import check_sequence_equivalence

CTX_LEN = 12


def _cache(reference: onnx.ModelProto, **options) -> tuple[ir.Model, KVCachePass]:
    model = ir.from_proto(reference)
    kv = KVCachePass(**options)
    kv(model)
    return model, kv


@pytest.mark.parametrize("style", ["retained", "concat"])
@pytest.mark.parametrize(
    ("mask", "softcap"), [("bool", 0.0), ("float", 5.0), ("window", 0.0)], ids=["bool", "float-softcap", "window3"]
)
def test_mask_spellings_replay_like_the_no_cache_graph(mask: str, softcap: float, style: str) -> None:
    reference = graphs.decoder(mask=mask, softcap=softcap)
    model, kv = _cache(reference, style=style, ctx_len=CTX_LEN, logits="all")
    result = check_sequence_equivalence(ir.to_proto(model), reference, examples=15, max_len=CTX_LEN - 1,
                                        require_greedy=True)
    assert result.equivalent, f"{result}\n{kv.report.notes}"
    expected = "causal, sliding window 3" if mask == "window" else "causal"
    assert f"0: {expected}, 1: {expected}" in kv.report.notes[0]
    assert all(n.attributes.get_float("softcap", 0.0) == softcap for n in model.graph if n.op_type == "Attention")


@pytest.mark.parametrize("style", ["retained", "concat"])
def test_is_causal_without_a_mask(style: str) -> None:
    """Without padding the meanings agree; the cached graph also masks padding, which the reference cannot."""
    reference = graphs.decoder(mask="causal-attr")
    model, kv = _cache(reference, style=style, ctx_len=CTX_LEN, logits="all")
    result = check_sequence_equivalence(ir.to_proto(model), reference, examples=10, max_len=CTX_LEN - 1,
                                        padding="none", require_greedy=True)
    assert result.equivalent, str(result)
    assert any("is_causal without a mask" in n for n in kv.report.notes)
    assert all(n.attributes.get_int("is_causal", 0) == 0 for n in model.graph if n.op_type == "Attention")


def test_a_bidirectional_mask_is_bad_input_naming_the_layer() -> None:
    """An encoder's mask is not something the pass failed at: the input is not a decoder (exit 2)."""
    with pytest.raises(BadInputError, match=r"layer 0 \(Attention node .*query 0 sees the later key 1 .*not a decoder"):
        _cache(graphs.decoder(mask="bidirectional"), style="retained", ctx_len=CTX_LEN)


def test_a_graph_without_logits_is_bad_input_before_attention_runs() -> None:
    """The decoder interface is checked first, so whether attention would fuse does not change the exit code."""
    from qgraph.manager import PassManager

    reference = graphs.decoder()
    reference.graph.output[0].name = "hidden"
    reference.graph.node[-1].output[0] = "hidden"
    with pytest.raises(BadInputError, match=r"requires a decoder's interface \(input input_ids, output logits\)"):
        PassManager([{"pass": "kv-cache"}]).run(ir.from_proto(reference))


@pytest.mark.parametrize("style", ["retained", "concat"])
@pytest.mark.parametrize("positions", ["range", "range-direct"])
def test_positions_counted_from_the_chunk_start_become_position_ids(style: str, positions: str) -> None:
    """Range(0, seq) restarts at 0 every chunk; rewired, decode steps continue after the past.

    ``range``: [1, S] (a batch axis to take position_ids' rows); ``range-direct``:
    [S] straight into the table, so the rewired positions prepend the batch axis.
    The no-cache graph gives a left-padded row shifted positions; the replay
    compares such a row with the reference's logits for the row unpadded.
    """
    reference = graphs.decoder(positions=positions)
    model, kv = _cache(reference, style=style, ctx_len=CTX_LEN, logits="all")
    result = check_sequence_equivalence(ir.to_proto(model), reference, examples=15, max_len=CTX_LEN - 1,
                                        require_greedy=True)
    assert result.equivalent, str(result)
    assert any("counted from the chunk start" in n for n in kv.report.notes)


@pytest.mark.parametrize("style", ["retained", "concat"])
def test_positions_that_depend_on_the_length_are_refused_naming_the_value(style: str) -> None:
    """seq - 1 - Range(0, seq) equals positions only on a whole sequence: the chunk probe catches it."""
    with pytest.raises(PassFailure, match=r"do not compute what the export computed: 'gather_\d+' \(read by Add .*differs from "
                                          r"the original on a chunk at positions 6\.\.8"):
        _cache(graphs.decoder(positions="reversed"), style=style, ctx_len=CTX_LEN)


def test_an_unaccounted_use_of_the_mask_is_refused_and_the_graph_kept() -> None:
    """The last check runs after the rewrite (on a copy): the model handed in stays as it was."""
    reference = graphs.decoder(mask_scales_logits=True)
    model = ir.from_proto(reference)
    with pytest.raises(PassFailure, match=r"read by Mul 'n\d+_Mul'\) is computed from the attention mask's values"):
        KVCachePass(style="retained", ctx_len=CTX_LEN)(model)
    assert ir.to_proto(model) == ir.to_proto(ir.from_proto(reference))


def test_a_graph_with_a_retained_cache_is_bad_input() -> None:
    model, _ = _cache(graphs.decoder(), style="retained", ctx_len=CTX_LEN)
    with pytest.raises(BadInputError, match="already has a retained-state cache"):
        KVCachePass(style="retained")(model)


def test_failure_leaves_the_graph_unchanged() -> None:
    """The rewrite works on a copy: a graph refused after the rewrite began is still the graph that came in."""
    reference = graphs.decoder(positions="reversed")
    model = ir.from_proto(reference)
    with pytest.raises(PassFailure):
        KVCachePass(style="concat")(model)
    assert ir.to_proto(model) == ir.to_proto(ir.from_proto(reference))


def test_padding_never_writes_a_slot_a_valid_query_reads() -> None:
    """A padded prefill leaves every slot but ctx_len - 1 as a valid token or the initial zeros."""
    model, _ = _cache(graphs.decoder(layers=1), style="retained", ctx_len=CTX_LEN, logits="all")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    positions = np.array([[-1, -1, 0, 1, 2], [0, 1, 2, -1, -1]])
    zeros = np.zeros((2, graphs.KV_HEADS, CTX_LEN, graphs.HEAD_DIM), np.float32)
    outputs = session.run(None, {"input_ids": np.ones((2, 5), np.int64), "position_ids": positions,
                                 "past_key.0": zeros, "past_value.0": zeros})
    for state in outputs[1:]:
        assert np.all(state[:, :, 3 : CTX_LEN - 1] == 0)
        assert np.all(np.abs(state[:, :, :3]).sum(axis=-1) > 0)


# --- CtxScatter --------------------------------------------------------------------------


@st.composite
def _scatter_case(draw):
    batch, heads, ctx, dim = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 8)), draw(st.integers(1, 4))
    seq = draw(st.integers(1, ctx))
    slots = np.stack([draw(st.permutations(range(ctx)))[:seq] for _ in range(batch)]).astype(np.int64)
    floats = st.floats(-4, 4, width=32)
    data = draw(hnp.arrays(np.float32, (batch, heads, ctx, dim), elements=floats))
    updates = draw(hnp.arrays(np.float32, (batch, heads, seq, dim), elements=floats))
    return data, slots, updates


@settings(max_examples=20, deadline=None)
@given(_scatter_case())
def test_ctx_scatter_body_writes_each_rows_slots_at_opset_17(case) -> None:
    """The function body runs at opset 17 (the qaic preset's final opset) and means data[b, :, slots[b, s]] = updates."""
    data, slots, updates = case
    graph = ir.Graph(
        [ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT if n != "slots" else ir.DataType.INT64),
                  shape=ir.Shape([f"{n}_{i}" for i in range(2 if n == "slots" else 4)]))
         for n in ("data", "slots", "updates")],
        [], nodes=[], opset_imports={"": 17}, name="ctx_scatter",
    )
    node = ir.node("CtxScatter", list(graph.inputs), domain="com.qualcomm.cloud")
    graph.append(node)
    node.outputs[0].name = "out"
    node.outputs[0].type, node.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), graph.inputs[0].shape
    graph.outputs.append(node.outputs[0])
    model = ir.Model(graph, ir_version=8)
    attach_function(model, ctx_scatter_function())
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"data": data, "slots": slots, "updates": updates})[0]
    expected = data.copy()
    for b in range(slots.shape[0]):
        expected[b][:, slots[b]] = updates[b]
    np.testing.assert_array_equal(out, expected)


# --- device files --------------------------------------------------------------------------


def test_device_files_are_written_beside_the_model(tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(graphs.decoder(), source)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    code = cli_main(["optimize", str(source), "-o", str(out), "--passes", "kv-cache",
                     "--option", "kv-cache.style=retained", "--option", f"kv-cache.ctx_len={CTX_LEN}",
                     "--option", "kv-cache.prefill_len=8", "--option", "kv-cache.batch_size=2"])
    assert code == 0
    specializations = json.loads((out.parent / "specializations.json").read_text())["specializations"]
    assert specializations == [  # QEfficient's named form, values as strings
        {"name": "Prefill", "symbols": {"batch_size": "2", "seq_len": "8", "ctx_len": str(CTX_LEN)}},
        {"name": "Decode", "symbols": {"batch_size": "2", "seq_len": "1", "ctx_len": str(CTX_LEN)}},
    ]
    saved = qio.load(out)
    dims = {d.value for v in saved.graph.inputs for d in v.shape if isinstance(d, ir.SymbolicDim)}
    assert "ctx_len" in dims  # one graph for every compiled context length
    assert {e for entry in specializations for e in entry["symbols"]} == dims  # every symbolic dim specialized
    custom_io = (out.parent / "custom_io.yaml").read_text()
    entries = [block.split("\n") for block in custom_io.strip().split("\n\n")]
    names = [line.split(": ")[1] for line, _ in entries]
    assert {line.split(": ")[1] for _, line in entries} == {"float16"}
    layers = len([v for v in saved.graph.inputs if v.name.startswith("past_key.")])
    assert names == [f"past_{kind}.{i}{suffix}" for i in range(layers) for kind in ("key", "value")
                     for suffix in ("", "_RetainedState")]  # QEfficient's order: each input, then its output
    assert set(names) == {v.name for v in saved.graph.inputs[2:]} | {v.name for v in saved.graph.outputs[1:]}
    assert not any(k.startswith(qio.SIDECAR_PREFIX) for k in saved.metadata_props)


@pytest.mark.parametrize(("options", "expected"), [
    ({"specializations": "flat", "prefill_len": 8},
     [{"batch_size": "1", "seq_len": "8", "ctx_len": "12"}, {"batch_size": "1", "seq_len": "1", "ctx_len": "12"}]),
    ({"full_batch_size": 4, "prefill_len": 8},
     [{"name": "Prefill", "symbols": {"batch_size": "1", "seq_len": "8", "ctx_len": "12", "full_batch_size": "4"}},
      {"name": "Decode", "symbols": {"batch_size": "4", "seq_len": "1", "ctx_len": "12", "full_batch_size": "4"}}]),
    ({"comp_ctx_lengths": "8,4", "prefill_len": 3},
     [{"name": f"{phase}_{i}", "symbols": {"batch_size": "1", "seq_len": seq, "ctx_len": "12",
                                          "comp_ctx_lengths": ccl}}
      for phase, seq in (("Prefill", "3"), ("Decode", "1")) for i, ccl in enumerate(("4", "8"))]),
])
def test_specializations_follow_the_serving_options(options: dict, expected: list) -> None:
    """Flat form on request; continuous batching prefills one row and decodes all; one entry per CCL."""
    model, _ = _cache(graphs.decoder(), style="retained", ctx_len=CTX_LEN, **options)
    assert json.loads(qio.sidecar_files(model)["specializations.json"])["specializations"] == expected


def test_mxint8_kv_cache_is_written_to_custom_io() -> None:
    model, _ = _cache(graphs.decoder(), style="retained", ctx_len=CTX_LEN, kv_dtype="mxint8")
    text = qio.sidecar_files(model)["custom_io.yaml"]
    assert text.count("Precision: mxint8") == text.count("IOName:") > 0


def test_concat_style_writes_no_device_files() -> None:
    model, _ = _cache(graphs.decoder(), style="concat")
    assert not qio.sidecar_files(model)


# --- --verify -----------------------------------------------------------------------------------


def test_verify_checks_the_cache_step_by_sequence_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--verify`` proves a kv-cache step by replay, and names the pass when the cache is wrong."""
    from qgraph_passes.kv_cache import analysis as kv_cache
    from qgraph_passes.kv_cache.probe import MaskMeaning

    from qgraph.verify import step_verifier

    reference = graphs.decoder(mask="window")
    verify = step_verifier(examples=15)
    good, _ = _cache(reference, style="retained", ctx_len=CTX_LEN)
    meaning = KVCachePass.meaning
    verify(ir.from_proto(reference), good, "kv-cache", meaning=meaning)
    monkeypatch.setattr(kv_cache, "mask_meaning", lambda *a, **k: MaskMeaning(None))  # forget the window
    wrong, _ = _cache(reference, style="retained", ctx_len=CTX_LEN)
    with pytest.raises(PassFailure, match="NOT SEQUENCE-EQUIVALENT") as caught:
        verify(ir.from_proto(reference), wrong, "kv-cache", meaning=meaning)
    assert caught.value.pass_name == "kv-cache"

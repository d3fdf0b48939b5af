"""The retained form's serving variants: symbolic ctx_len, padding never written, continuous batching, CCL.

Each property is stated on what the graph computes in onnxruntime:

* one graph serves several context lengths (ctx_len is a symbolic dim);
* a padded prefill leaves the cache exactly as the unpadded one does --
  every row, every slot (QEfficient's export needs INT32_MAX indices for
  this, which onnxruntime rejects);
* continuous batching: requests interleaved in the cache's rows, a new one
  prefilled into a row another has just left while the rest decode, each
  give the logits of the request alone (:mod:`qgraph.verify.slots`);
* compute-context lengths: logits equal the full-context ones while the
  context fits, and attention reads nothing past the first CCL slots.

Every variant runs with both spellings: ScatterND/Gather/Slice and the
device's ``com.qualcomm.cloud`` ops through their function bodies.
"""

from __future__ import annotations

import kv_cache_graphs as graphs
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qgraph_passes.kv_cache import KVCachePass

from qgraph.verify.sequence import SequenceReplayer, check_sequence_equivalence
from qgraph.verify.slots import SlotRequest, SlotSchedule, check_slots, replay_slots

CTX_LEN = 12
SPELLINGS = ("scatternd", "ctx-scatter")


def _cached(tmp_path, reference: onnx.ModelProto, **options):
    from qgraph import io as qio

    model = ir.from_proto(reference)
    KVCachePass(style="retained", ctx_len=CTX_LEN, **options)(model)
    path = tmp_path / "cached" / "model.onnx"
    path.parent.mkdir(exist_ok=True)
    qio.save(model, path)
    ref = tmp_path / "reference.onnx"
    onnx.save(reference, ref)
    return path, ref, model


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _cache_inputs(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.inputs if v.name.startswith("past_")]


# --- symbolic ctx_len ---------------------------------------------------------------------------


@pytest.mark.parametrize("scatter", SPELLINGS)
def test_one_graph_serves_several_context_lengths(tmp_path, scatter: str) -> None:
    cached, reference, model = _cached(tmp_path, graphs.decoder(mask="window"), scatter=scatter)
    for name in _cache_inputs(model):
        assert next(v for v in model.graph.inputs if v.name == name).shape[2] == ir.SymbolicDim("ctx_len")
    for ctx_len in (6, 20):
        result = check_sequence_equivalence(cached, reference, ctx_len=ctx_len, examples=6, require_greedy=True)
        assert result.equivalent, f"ctx_len {ctx_len}: {result}"


# --- padding is never written -----------------------------------------------------------------


def _run(session, model, ids, positions, state, **extra):
    feeds = {"input_ids": ids, "position_ids": positions, **state, **extra}
    names = [o.name for o in model.graph.outputs]
    out = dict(zip(names, session.run(None, feeds)))
    return {name: out[f"{name}_RetainedState"] for name in _cache_inputs(model)}


@settings(max_examples=12, deadline=None)
@given(length=st.integers(1, 6), pad=st.integers(1, 4), filled=st.integers(0, 5), seed=st.integers(0, 2**16),
       scatter=st.sampled_from(SPELLINGS), batching=st.booleans())
def test_a_padded_prefill_leaves_the_cache_as_the_unpadded_one(tmp_path_factory, length, pad, filled, seed,
                                                                scatter, batching) -> None:
    """Bit for bit, every slot of every row: padding tokens (position -1) write nothing.

    The cache starts from random content (another sequence's leftovers), so
    a padding write of anything -- zeros, the new K/V, a wrapped index --
    would show in some slot.
    """
    tmp_path = tmp_path_factory.mktemp("pad")
    options = {"scatter": scatter, **({"full_batch_size": 3} if batching else {})}
    cached, _, model = _cached(tmp_path, graphs.decoder(), **options)
    session = _session(cached)
    rng = np.random.default_rng(seed)
    rows = 3 if batching else 1
    state = {name: rng.standard_normal((rows, graphs.KV_HEADS, CTX_LEN, graphs.HEAD_DIM)).astype(np.float32)
             for name in _cache_inputs(model)}
    tokens = rng.integers(0, graphs.VOCAB, (1, length))
    extra = {"batch_index": np.array([[filled % rows]])} if batching else {}
    plain = _run(session, model, tokens, np.arange(length)[None], state, **extra)
    padded_ids = np.concatenate([np.zeros((1, pad), np.int64), tokens], axis=1)
    padded_pos = np.concatenate([np.full((1, pad), -1), np.arange(length)[None]], axis=1)
    padded = _run(session, model, padded_ids, padded_pos, state, **extra)
    for name in plain:
        np.testing.assert_array_equal(padded[name], plain[name], err_msg=name)


# --- continuous batching ----------------------------------------------------------------------------


@pytest.mark.parametrize("scatter", SPELLINGS)
@pytest.mark.parametrize("mask", ["bool", "window", "float"])
def test_interleaved_requests_in_slots_give_each_sequence_alone(tmp_path, scatter: str, mask: str) -> None:
    cached, reference, model = _cached(tmp_path, graphs.decoder(mask=mask), scatter=scatter, full_batch_size=3,
                                       logits="last")
    names = [v.name for v in model.graph.inputs]
    assert "batch_index" in names and "attention_mask" not in names
    for name in _cache_inputs(model):
        assert list(next(v for v in model.graph.inputs if v.name == name).shape)[0] == "full_batch_size"
    if scatter == "ctx-scatter":
        assert {n.op_type for n in model.graph if n.domain == "com.qualcomm.cloud"} == {"CtxScatterCB", "CtxGatherCB"}
    with SequenceReplayer(cached, reference) as replayer:
        failure = check_slots(replayer, examples=10, slots=3)
    assert failure is None, str(failure)


def _write_rows_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken pass: the ScatterND writes row b of the batch into cache row b, not row batch_index[b]."""
    from qgraph_passes.kv_cache import retained

    original = retained._Shared.scatter_indices

    def wrong_rows(self, heads):
        rows, self.rows = self.rows, None
        try:
            return original(self, heads)
        finally:
            self.rows = rows

    monkeypatch.setattr(retained._Shared, "scatter_indices", wrong_rows)


def test_a_slot_that_ignores_batch_index_is_caught(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slot replay has teeth: writing row b instead of row batch_index[b] fails it."""
    _write_rows_in_order(monkeypatch)
    cached, reference, _ = _cached(tmp_path, graphs.decoder(), full_batch_size=2)
    schedule = SlotSchedule((SlotRequest((1, 2, 3, 4), 2), SlotRequest((5, 6, 7), 1), SlotRequest((8, 9), 1)), 2)
    with SequenceReplayer(cached, reference) as replayer:
        result = replay_slots(replayer, schedule)
    assert not result.passed, str(result)


def test_slot_replay_reuses_rows_and_runs_prefill_beside_decodes(tmp_path) -> None:
    """The schedule the property draws does what it claims: more requests than rows, a row reused mid-decode."""
    cached, reference, _ = _cached(tmp_path, graphs.decoder(), full_batch_size=2)
    schedule = SlotSchedule((SlotRequest((1, 2, 3, 4, 5), 2), SlotRequest((6, 7), 1), SlotRequest((8, 9, 10), 2)), 2)
    with SequenceReplayer(cached, reference) as replayer:
        result = replay_slots(replayer, schedule)
    assert result.passed, str(result)
    by_request = {}
    for check in result.checks:
        by_request.setdefault(check.request, []).append(check)
    assert [c.position for c in by_request[0]] == [1, 2, 3, 4]
    assert by_request[2][0].slot == by_request[1][0].slot == 1  # request 2 took the row request 1 left
    assert by_request[2][0].step < by_request[0][-1].step  # ... while request 0 was still decoding


# --- compute-context lengths -----------------------------------------------------------------------


@pytest.mark.parametrize("scatter", SPELLINGS)
def test_compute_context_logits_equal_full_context_while_it_fits(tmp_path, scatter: str) -> None:
    cached, reference, model = _cached(tmp_path, graphs.decoder(mask="window"), scatter=scatter,
                                       comp_ctx_lengths="4,8")
    assert "comp_ctx_lengths" in [v.name for v in model.graph.inputs]
    for ccl in (4, 8):
        result = check_sequence_equivalence(cached, reference, examples=6, max_len=ccl - 1, require_greedy=True,
                                            compute_context_len=ccl)
        assert result.equivalent, f"ccl {ccl}: {result}"


@pytest.mark.parametrize("scatter", SPELLINGS)
@pytest.mark.parametrize("batching", [False, True])
def test_attention_reads_nothing_past_the_compute_context(tmp_path, scatter: str, batching: bool) -> None:
    """NaN in every slot from CCL on leaves the logits as they are: those slots are never read."""
    options = {"scatter": scatter, "comp_ctx_lengths": "4", **({"full_batch_size": 1} if batching else {})}
    cached, _, model = _cached(tmp_path, graphs.decoder(), **options)
    session = _session(cached)
    rng = np.random.default_rng(0)
    clean = {name: rng.standard_normal((1, graphs.KV_HEADS, CTX_LEN, graphs.HEAD_DIM)).astype(np.float32)
             for name in _cache_inputs(model)}
    dirty = {name: value.copy() for name, value in clean.items()}
    for value in dirty.values():
        value[:, :, 4:] = np.nan
    feeds = {"input_ids": np.array([[3]]), "position_ids": np.array([[2]]), "comp_ctx_lengths": np.zeros(4, np.int64),
             **({"batch_index": np.array([[0]])} if batching else {})}
    want = session.run(["logits"], {**feeds, **clean})[0]
    got = session.run(["logits"], {**feeds, **dirty})[0]
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
    if scatter == "scatternd":  # with the whole cache as the compute context, the NaN is read (CtxGather
        # also skips the slots past the row's last position, so the device spelling never reads them)
        feeds["comp_ctx_lengths"] = np.zeros(CTX_LEN, np.int64)
        assert not np.isfinite(session.run(["logits"], {**feeds, **dirty})[0]).all()


def test_serving_variants_compose(tmp_path) -> None:
    """Continuous batching with compute-context lengths, on the device's ops."""
    cached, reference, model = _cached(tmp_path, graphs.decoder(mask="window"), scatter="ctx-scatter",
                                       full_batch_size=2, comp_ctx_lengths="6,11")
    names = [v.name for v in model.graph.inputs]
    assert {"batch_index", "comp_ctx_lengths"} <= set(names)
    with SequenceReplayer(cached, reference) as replayer:
        replayer.compute_context_len = 11
        assert check_slots(replayer, examples=8, slots=2) is None


# --- prefill-only and decode-only graphs -------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(prompt=st.integers(1, 6), decode=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_a_prefill_graph_hands_its_cache_to_a_decode_graph(tmp_path_factory, prompt, decode, seed) -> None:
    """Disaggregated serving: prefill on one graph, decode on the other, the logits of the whole sequence."""
    import json

    from qgraph import io as qio

    tmp_path = tmp_path_factory.mktemp("phases")
    reference = graphs.decoder(mask="window")
    graphs_by_phase = {}
    for phase in ("prefill", "decode"):
        folder = tmp_path / phase
        folder.mkdir()
        graphs_by_phase[phase] = _cached(folder, reference, phase=phase, scatter="ctx-scatter")
    decode_model = graphs_by_phase["decode"][2]
    ids_input = next(v for v in decode_model.graph.inputs if v.name == "input_ids")
    assert list(ids_input.shape) == ["batch_size", 1]
    for phase, (_, _, model) in graphs_by_phase.items():
        names = [e["name"] for e in json.loads(qio.sidecar_files(model)["specializations.json"])["specializations"]]
        assert names == [phase.capitalize()]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, graphs.VOCAB, prompt + decode)
    want = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": tokens[None], "attention_mask": np.ones((1, tokens.size), np.int64)})[0][0]
    sessions = {phase: _session(path) for phase, (path, _, _) in graphs_by_phase.items()}
    model = graphs_by_phase["prefill"][2]
    state = {name: np.zeros((1, graphs.KV_HEADS, CTX_LEN, graphs.HEAD_DIM), np.float32) for name in _cache_inputs(model)}
    outputs = [o.name for o in model.graph.outputs]
    got = dict(zip(outputs, sessions["prefill"].run(outputs, {"input_ids": tokens[None, :prompt],
                                                               "position_ids": np.arange(prompt)[None], **state})))
    np.testing.assert_allclose(got["logits"][0, -1], want[prompt - 1], rtol=1e-4, atol=1e-4)
    for position in range(prompt, prompt + decode):
        state = {name: got[f"{name}_RetainedState"] for name in state}
        got = dict(zip(outputs, sessions["decode"].run(outputs, {"input_ids": tokens[None, position:position + 1],
                                                                  "position_ids": np.array([[position]]), **state})))
        np.testing.assert_allclose(got["logits"][0, -1], want[position], rtol=1e-4, atol=1e-4)


def test_verify_serves_requests_through_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--verify`` of a continuous-batching step replays request streams; a write into the wrong row fails it."""
    from qgraph.errors import PassFailure
    from qgraph.verify import step_verifier

    reference = ir.from_proto(graphs.decoder())
    verify = step_verifier(examples=8)
    good = ir.from_proto(graphs.decoder())
    KVCachePass(style="retained", ctx_len=CTX_LEN, full_batch_size=2)(good)
    verify(reference, good, "kv-cache", meaning=KVCachePass.meaning)

    _write_rows_in_order(monkeypatch)
    bad = ir.from_proto(graphs.decoder())
    KVCachePass(style="retained", ctx_len=CTX_LEN, full_batch_size=2)(bad)
    with pytest.raises(PassFailure, match="cache rows"):
        verify(reference, bad, "kv-cache", meaning=KVCachePass.meaning)


def test_speculative_target_with_continuous_batching_and_compute_context(tmp_path) -> None:
    """The serving options compose on one graph: K+1 kept logits equal the no-cache ones, and requests in rows
    each give their own logits (one kept logit), with a compute-context length fed."""
    cached, reference, model = _cached(tmp_path, graphs.decoder(mask="window"), scatter="ctx-scatter",
                                       full_batch_size=2, comp_ctx_lengths="6,11", num_speculative_tokens=2,
                                       prefill_len=4)
    assert {"batch_index", "comp_ctx_lengths", "num_logits_to_keep"} <= {v.name for v in model.graph.inputs}
    result = check_sequence_equivalence(cached, reference, examples=6, logits_to_keep=3, require_greedy=True,
                                        max_len=10)
    assert result.equivalent, str(result)
    with SequenceReplayer(cached, reference) as replayer:
        assert check_slots(replayer, examples=6, slots=2) is None

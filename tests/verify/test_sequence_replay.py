"""Sequence equivalence of KV-cache graphs (qgraph.verify.sequence) on hand-built tiny LMs.

The three forms in ``kv_graphs`` compute the same function; the correct
cached forms must match the no-cache graph on every drawn sequence, split
and padding, and every mutant must be caught with the step and position
where it first diverges.
"""

from __future__ import annotations

import json

import hypothesis
import kv_graphs as kv
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph import io as qio
from qgraph.errors import BadInputError
from qgraph.verify import sequence as seqmod
from qgraph.verify.compare import Tolerance
from qgraph.verify.kv_contract import KVLayoutError, detect_kv_layout, reference_layout
from qgraph.verify.sequence import (
    ReplayCase,
    SequenceReplayer,
    check_sequence_equivalence,
    padding_mask,
    replay,
    replay_cases,
)

EXAMPLES = 25
# Derandomized: whether the strategy reaches a kind of case must not depend on a lucky draw (300 random
# examples once missed a padded batch with a later chunk and a decode step).
FIND = settings(max_examples=300, database=None, deadline=None, derandomize=True,
                phases=[hypothesis.Phase.generate, hypothesis.Phase.shrink])


def _tokens(batch: int, total: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, kv.VOCAB, (batch, total))


# --- the strategy ------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.integers(1, 6).flatmap(
        lambda max_chunk: st.tuples(st.just(max_chunk), replay_cases(kv.VOCAB, 7, 3, max_chunk=max_chunk))
    )
)
def test_drawn_cases_are_valid(drawn: tuple[int, ReplayCase]) -> None:
    max_chunk, case = drawn
    assert 1 <= case.batch <= 3 and 1 <= case.total_len <= 7
    assert case.tokens.dtype == np.int64 and ((case.tokens >= 0) & (case.tokens < kv.VOCAB)).all()
    assert sum(case.split) == case.total_len and all(1 <= k <= max_chunk for k in case.split)
    assert all(n >= 1 for n in case.lengths)  # every row keeps a valid token
    side = case.padding if case.padding in ("left", "right") else "right"
    assert (case.valid == padding_mask(case.lengths, case.total_len, side)).all()  # one contiguous block per row
    pos = case.positions
    assert ((pos == -1) == ~case.valid).all()
    for row, n in enumerate(case.lengths):
        assert pos[row][case.valid[row]].tolist() == list(range(n))


def test_strategy_reaches_padded_batches_with_chunks_and_decode_steps() -> None:
    """Left and right padded batches whose split has a prefill, a later chunk and a decode step are drawn."""
    for side in ("left", "right"):

        def wanted(case: ReplayCase, side: str = side) -> bool:
            return (
                case.padding == side
                and case.batch >= 2
                and len(set(case.lengths)) > 1
                and 1 in case.split[1:]
                and any(k > 1 for k in case.split[1:])
            )

        case = hypothesis.find(replay_cases(kv.VOCAB, 8, 3), wanted, settings=FIND)
        assert wanted(case)


def test_strategy_shrinks_to_the_smallest_case() -> None:
    """Asking for two steps shrinks to one row of two tokens, unpadded, split [1, 1]."""
    case = hypothesis.find(replay_cases(kv.VOCAB, 8, 3), lambda c: len(c.split) >= 2, settings=FIND)
    assert (case.batch, case.total_len, case.split, case.padding) == (1, 2, (1, 1), "none")


# --- correct forms pass ---------------------------------------------------------------

CORRECT = {
    "retained": lambda: (kv.retained_lm(), kv.no_cache_lm(), {}),
    "retained-last-logits": lambda: (kv.retained_lm(last_logits=True), kv.no_cache_lm(), {}),
    "retained-static-seq-3": lambda: (kv.retained_lm(seq_len=3), kv.no_cache_lm(), {}),
    "retained-2-layers-2-heads": lambda: (kv.retained_lm(layers=2, heads=2), kv.no_cache_lm(layers=2, heads=2), {}),
    "retained-symbolic-ctx": lambda: (kv.retained_lm(ctx_len=None), kv.no_cache_lm(), {"ctx_len": 12}),
    "concat": lambda: (kv.concat_lm(), kv.no_cache_lm(), {}),
    "concat-2-layers-2-heads": lambda: (kv.concat_lm(layers=2, heads=2), kv.no_cache_lm(layers=2, heads=2), {}),
    "concat-vs-reference-with-position-ids": lambda: (kv.concat_lm(), kv.no_cache_lm(position_ids_input=True), {}),
}


@pytest.mark.parametrize("form", sorted(CORRECT))
def test_correct_cached_forms_are_sequence_equivalent(form: str) -> None:
    cached, reference, kwargs = CORRECT[form]()
    result = check_sequence_equivalence(cached, reference, examples=EXAMPLES, **kwargs)
    assert result.equivalent, str(result)
    assert result.examples >= EXAMPLES - 5  # distinct cases actually replayed (hypothesis dedups a few)
    assert result.case is None and result.result is None


# --- mutants are caught, at the right step and position -------------------------------

# (mutant graph, expected first failing step index, step kind, position)
MUTANTS = {
    "late_write": (lambda: kv.retained_lm(mutant="late_write"), 0, "prefill", 0),
    "mask_strict": (lambda: kv.retained_lm(mutant="mask_strict"), 0, "prefill", 0),
    "stale_state": (lambda: kv.retained_lm(mutant="stale_state"), 1, "decode", 1),
    "stale_state_last_logits": (lambda: kv.retained_lm(mutant="stale_state", last_logits=True), 1, "decode", 1),
    "ignore_past": (lambda: kv.concat_lm(mutant="ignore_past"), 1, "decode", 1),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutants_are_caught_with_step_and_position(name: str) -> None:
    build, step_index, kind, position = MUTANTS[name]
    result = check_sequence_equivalence(build(), kv.no_cache_lm(), examples=EXAMPLES)
    assert not result.equivalent
    # Shrunk to the smallest case that shows the bug: one unpadded row, one token a step.
    assert result.case is not None and result.case.batch == 1 and result.case.padding == "none"
    assert result.case.split == (1,) * (step_index + 1)
    step, check = result.result.first_failure
    assert (step.index, step.kind, check.row, check.position) == (step_index, kind, 0, position)
    assert not check.passed and check.max_abs_error > 1e-2
    text = str(result)
    assert f"first divergence: step {step_index} ({kind}, column {position}), row 0, column {position}" in text
    assert f"split {list(result.case.split)}" in text


def test_concat_present_without_the_past_is_reported_at_the_step_it_breaks() -> None:
    result = check_sequence_equivalence(kv.concat_lm(mutant="drop_past"), kv.no_cache_lm(), examples=EXAMPLES)
    assert not result.equivalent
    step, check = result.result.first_failure
    assert check is None and step.index == 1
    assert "present.0.key" in step.error and "past 1 + seq 1 = 2" in step.error
    assert "first divergence: step 1 (decode, column 1): present.0.key" in str(result)


# --- one replay, looked at closely ------------------------------------------------------


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("cached", ["retained", "concat"])
def test_padded_batch_compares_exactly_the_valid_positions(cached: str, padding: str) -> None:
    model = kv.retained_lm() if cached == "retained" else kv.concat_lm()
    lengths = [5, 2, 4]
    result = replay(model, kv.no_cache_lm(), _tokens(3, 5), [3, 1, 1], lengths=lengths, padding=padding)
    assert result.passed, str(result)
    assert [s.kind for s in result.steps] == ["prefill", "decode", "decode"]
    valid = padding_mask(lengths, 5, padding)
    assert sorted((c.row, c.column) for c in result.checks) == sorted(zip(*np.nonzero(valid)))
    assert result.greedy_agreement == 1.0 and result.max_abs_error < 1e-4
    for c in result.checks:  # each checked token's position counts valid tokens before it in its row
        assert c.position == int(valid[c.row, : c.column].sum())


@pytest.mark.parametrize("padding", ["left", "right"])
def test_last_token_logits_are_compared_at_each_rows_last_valid_column(padding: str) -> None:
    lengths = [5, 2]
    result = replay(
        kv.retained_lm(last_logits=True), kv.no_cache_lm(), _tokens(2, 5), [3, 2], lengths=lengths, padding=padding
    )
    assert result.passed, str(result)
    valid = padding_mask(lengths, 5, padding)
    expected = []
    for step_index, (a, b) in enumerate([(0, 3), (3, 5)]):
        for row in range(2):
            cols = np.flatnonzero(valid[row, a:b])
            if cols.size:
                expected.append((step_index, row, a + int(cols[-1])))
    assert [(c.step, c.row, c.column) for c in result.checks] == expected
    assert {s.logits_at for s in result.steps} == {"last valid position"}


def test_static_seq_specialization_pads_short_chunks_with_position_minus_one() -> None:
    model = kv.retained_lm(seq_len=3)
    result = replay(model, kv.no_cache_lm(), _tokens(2, 6), [3, 2, 1], lengths=[6, 4], padding="left")
    assert result.passed, str(result)
    assert [s.fed_len for s in result.steps] == [3, 3, 3]
    assert "padded to 3" in str(result)
    with pytest.raises(BadInputError, match="at most 3 tokens a step"):
        replay(model, kv.no_cache_lm(), _tokens(1, 6), [4, 2])


def test_positions_must_fit_the_cache() -> None:
    with pytest.raises(BadInputError, match="ctx_len 10"):
        replay(kv.retained_lm(), kv.no_cache_lm(), _tokens(1, 11), [11])


# --- the single reference run is the per-prefix run ---------------------------------------


@settings(max_examples=30, deadline=None, database=None)
@given(replay_cases(kv.VOCAB, 7, 3))
def test_one_full_reference_run_gives_every_prefix_run(case: ReplayCase) -> None:
    """The justification of reference_mode="full": at each valid column of a prefix, the logits of
    the no-cache graph run on the prefix equal those of the run on the whole sequence (left padding
    included, with positions computed or fed by Hugging Face's rule)."""
    for reference in (kv.no_cache_lm(), kv.no_cache_lm(position_ids_input=True)):
        session = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}

        def run(stop: int, session: ort.InferenceSession = session, names: set[str] = names) -> np.ndarray:
            mask = case.valid[:, :stop].astype(np.int64)
            feeds = {"input_ids": case.tokens[:, :stop], "attention_mask": mask}
            if "position_ids" in names:
                feeds["position_ids"] = seqmod._hf_positions(mask, stop)
            return session.run(["logits"], feeds)[0]

        full = run(case.total_len)
        for _, stop in case.steps():
            prefix = run(stop)
            valid = case.valid[:, :stop]
            np.testing.assert_allclose(prefix[valid], full[:, :stop][valid], rtol=1e-5, atol=1e-5)


def test_prefix_reference_mode_agrees() -> None:
    result = check_sequence_equivalence(kv.retained_lm(), kv.no_cache_lm(), examples=10, reference_mode="prefix")
    assert result.equivalent, str(result)
    caught = check_sequence_equivalence(
        kv.retained_lm(mutant="stale_state"), kv.no_cache_lm(), examples=10, reference_mode="prefix"
    )
    assert not caught.equivalent and caught.result.first_failure[0].index == 1


# --- greedy agreement -------------------------------------------------------------------------


def test_greedy_agreement_decides_only_when_required() -> None:
    loose = Tolerance(atol=100.0, rtol=0.0, scale_atol=False)
    mutant = kv.concat_lm(mutant="ignore_past")
    lenient = check_sequence_equivalence(mutant, kv.no_cache_lm(), examples=EXAMPLES, tolerance=loose)
    assert lenient.equivalent
    strict = check_sequence_equivalence(
        mutant, kv.no_cache_lm(), examples=EXAMPLES, tolerance=loose, require_greedy=True
    )
    assert not strict.equivalent
    step, check = strict.result.first_failure
    assert check.passed and not check.greedy_agrees  # within tolerance, other token
    assert step.index >= 1 and "greedy token differs" in str(strict)


# --- layout detection -------------------------------------------------------------------------


def _drop_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    kept = [o for o in model.graph.output if o.name != name]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    return model


def test_layouts_are_read_from_the_graph_signature() -> None:
    r = detect_kv_layout(qio.load(kv.retained_lm(layers=2, heads=2, seq_len=3, last_logits=True)))
    assert (r.style, r.n_layers, r.n_kv_heads, r.head_dim, r.ctx_len, r.seq_len, r.logits_seq, r.vocab) == (
        "retained", 2, 2, 4, kv.CTX_LEN, 3, 1, kv.VOCAB
    )
    assert r.present[1] == ("past_key.1_RetainedState", "past_value.1_RetainedState")
    c = detect_kv_layout(qio.load(kv.concat_lm()))
    assert (c.style, c.n_layers, c.ctx_len, c.seq_len, c.has_position_ids) == ("concat", 1, None, None, True)
    assert c.past == (("past_key_values.0.key", "past_key_values.0.value"),)
    assert detect_kv_layout(qio.load(kv.retained_lm(ctx_len=None))).ctx_len is None


def test_unknown_layouts_name_what_is_missing() -> None:
    with pytest.raises(KVLayoutError, match=r"neither KV-cache contract(.|\n)*past_key\.\{i\}(.|\n)*past_key_values"):
        detect_kv_layout(qio.load(kv.no_cache_lm()))
    broken = _drop_output(kv.retained_lm(), "past_value.0_RetainedState")
    with pytest.raises(KVLayoutError, match=r"retained-style but lacks output 'past_value.0_RetainedState'"):
        detect_kv_layout(qio.load(broken))
    broken = _drop_output(kv.concat_lm(), "present.0.key")
    with pytest.raises(KVLayoutError, match=r"concat-style but lacks output 'present.0.key'"):
        check_sequence_equivalence(broken, kv.no_cache_lm())
    with pytest.raises(KVLayoutError, match="lacks input 'attention_mask'"):
        reference_layout(qio.load(kv.retained_lm()))


def test_symbolic_ctx_len_must_be_given() -> None:
    with pytest.raises(KVLayoutError, match="ctx_len is symbolic"):
        SequenceReplayer(kv.retained_lm(ctx_len=None), kv.no_cache_lm())
    with pytest.raises(KVLayoutError, match="fixes it at 10"):
        SequenceReplayer(kv.retained_lm(), kv.no_cache_lm(), ctx_len=12)


# --- sessions and reports ---------------------------------------------------------------------


def test_sessions_are_created_once_per_check(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[str] = []
    real = seqmod.OrtRunner

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            created.append(kwargs.get("label", "?"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(seqmod, "OrtRunner", Counting)
    result = check_sequence_equivalence(kv.retained_lm(mutant="stale_state"), kv.no_cache_lm(), examples=EXAMPLES)
    assert not result.equivalent and result.examples + result.shrink_runs > 2
    assert created == ["the reference", "the cached graph"]


def test_failure_report_is_json_ready() -> None:
    result = check_sequence_equivalence(kv.retained_lm(mutant="late_write"), kv.no_cache_lm(), examples=EXAMPLES)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["equivalent"] is False and data["style"] == "retained"
    assert data["result"]["first_failure"] == {"step": 0, "row": 0, "column": 0, "position": 0}
    assert data["case"]["split"] == list(result.case.split)


def test_checks_replay_padded_batches_in_several_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cases a passing check replays cover both padding sides, batches and multi-step splits."""
    seen: list[ReplayCase] = []
    real_run = SequenceReplayer.run

    def recording(self, case, **kwargs):
        seen.append(case)
        return real_run(self, case, **kwargs)

    monkeypatch.setattr(SequenceReplayer, "run", recording)
    assert check_sequence_equivalence(kv.retained_lm(), kv.no_cache_lm(), examples=EXAMPLES)
    assert {c.padding for c in seen if c.batch >= 2 and len(c.split) >= 2} >= {"left", "right"}
    assert any(1 in c.split[1:] for c in seen) and any(k > 1 for c in seen for k in c.split[1:])


def test_a_reference_that_cannot_run_the_cases_is_bad_input() -> None:
    reference = kv.no_cache_lm()
    for vi in reference.graph.input:  # a static seq of 3: onnxruntime rejects other lengths
        vi.type.tensor_type.shape.dim[1].dim_value = 3
    with pytest.raises(BadInputError, match="the reference fails on a drawn case"):
        check_sequence_equivalence(kv.retained_lm(), reference, examples=EXAMPLES)

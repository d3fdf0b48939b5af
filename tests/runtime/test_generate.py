"""Generation on the hand-built tiny LMs (tests/verify/kv_graphs.py) in every graph form.

The three forms compute the same function, so the reference is the plainest
possible greedy decoder, written here against onnxruntime directly: run the
no-cache graph on the whole unpadded prefix of one row, take the argmax of
the last position, append, repeat. Every engine (no-cache, concat, retained
with alias or swapped buffers, fixed or symbolic seq dim, last-token or full
logits) must produce exactly those tokens for every row of a padded batch.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verify import kv_graphs as kv

from qgraph.errors import BadInputError
from qgraph.runtime.engines import Engine, make_engine
from qgraph.runtime.generate import (
    STOP_CONTEXT,
    STOP_EOS,
    STOP_LENGTH,
    Generator,
    SamplingConfig,
)

LAYERS, HEADS, CTX = 2, 2, 16
CASES = settings(max_examples=25, deadline=None, database=None)
FORMS = ("no-cache", "concat", "retained-alias", "retained-swap", "retained-seq4", "retained-full-logits")


def _fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """The same graph with its batch dim made static (a device specialization)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def _build(form: str) -> Engine:
    if form == "no-cache":
        return make_engine(kv.no_cache_lm(layers=LAYERS, heads=HEADS), threads=1)
    if form == "concat":
        return make_engine(kv.concat_lm(layers=LAYERS, heads=HEADS), threads=1)
    binding = "swap" if form == "retained-swap" else "alias"
    model = kv.retained_lm(layers=LAYERS, heads=HEADS, ctx_len=CTX, seq_len=4 if form == "retained-seq4" else None,
                           last_logits=form != "retained-full-logits")
    return make_engine(model, threads=1, cache_binding=binding)


@pytest.fixture(scope="module")
def engines() -> dict[str, Engine]:
    return {form: _build(form) for form in FORMS}


@pytest.fixture(scope="module")
def reference() -> ort.InferenceSession:
    return ort.InferenceSession(kv.no_cache_lm(layers=LAYERS, heads=HEADS).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def _reference_logits(session: ort.InferenceSession, ids: list[int]) -> np.ndarray:
    row = np.array([ids], np.int64)
    return session.run(["logits"], {"input_ids": row, "attention_mask": np.ones_like(row)})[0][0, -1]


def _reference_greedy(session: ort.InferenceSession, prompt: list[int], steps: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(steps):
        token = int(np.argmax(_reference_logits(session, ids)))
        out.append(token)
        ids.append(token)
    return out


prompts_st = st.lists(st.lists(st.integers(0, kv.VOCAB - 1), min_size=1, max_size=7), min_size=1, max_size=3)


@CASES
@given(form=st.sampled_from(FORMS), prompts=prompts_st, new=st.integers(1, 6))
def test_greedy_tokens_equal_recomputing_the_prefix(engines, reference, form, prompts, new) -> None:
    result = Generator(engines[form]).generate_ids(prompts, max_new_tokens=new)
    for row, prompt in enumerate(prompts):
        assert result.token_ids[row] == _reference_greedy(reference, prompt, new), (form, row)
        assert result.stop_reasons[row] == STOP_LENGTH


@CASES
@given(form=st.sampled_from(FORMS), prompt=st.lists(st.integers(0, kv.VOCAB - 1), min_size=1, max_size=6),
       chunk=st.integers(1, 4))
def test_prefill_in_any_chunk_length_gives_the_same_tokens(engines, reference, form, prompt, chunk) -> None:
    if form == "retained-seq4":
        chunk = min(chunk, 4)  # the graph fixes its seq dim at 4; shorter chunks are padded with position -1
    result = Generator(engines[form], prefill_chunk=chunk).generate_ids([prompt], max_new_tokens=3)
    assert result.token_ids[0] == _reference_greedy(reference, prompt, 3)
    assert result.stats.prefill_runs == -(-len(prompt) // chunk)


@CASES
@given(form=st.sampled_from(FORMS), prompts=prompts_st, at=st.integers(0, 4), data=st.data())
def test_a_row_stops_at_its_first_eos_token(engines, reference, form, prompts, at, data) -> None:
    expected = [_reference_greedy(reference, p, 5) for p in prompts]
    eos = data.draw(st.sampled_from(expected[0][: at + 1]), label="eos")
    result = Generator(engines[form], eos_token_ids=[eos]).generate_ids(prompts, max_new_tokens=5)
    for row, full in enumerate(expected):
        if eos in full:
            stop = full.index(eos) + 1
            assert result.token_ids[row] == full[:stop] and result.stop_reasons[row] == STOP_EOS
        else:
            assert result.token_ids[row] == full and result.stop_reasons[row] == STOP_LENGTH


def test_retained_generation_stops_when_the_context_is_full(reference) -> None:
    engine = make_engine(kv.retained_lm(layers=LAYERS, heads=HEADS, ctx_len=8, last_logits=True), threads=1)
    prompt = [5, 9, 1, 3, 7]
    result = Generator(engine).generate_ids([prompt], max_new_tokens=10)
    # ctx_len 8 keeps the last slot for padding writes: 7 tokens, so 5 prompt + 2 fed back + 1 final token.
    assert result.token_ids[0] == _reference_greedy(reference, prompt, 3)
    assert result.stop_reasons == [STOP_CONTEXT]
    with pytest.raises(BadInputError, match="holds at most 7"):
        Generator(engine).generate_ids([list(range(8))], max_new_tokens=1)


def test_a_fixed_batch_graph_runs_a_larger_batch_in_groups(reference) -> None:
    model = _fixed_batch(kv.retained_lm(layers=LAYERS, heads=HEADS, ctx_len=CTX, last_logits=True), 2)
    engine = make_engine(model, threads=1)
    assert engine.fixed_batch == 2
    prompts = [[3, 4, 5], [7], [9, 9, 2, 1], [6, 8], [11]]
    result = Generator(engine).generate_ids(prompts, max_new_tokens=4)
    assert result.token_ids == [_reference_greedy(reference, p, 4) for p in prompts]
    assert result.stats.batch == len(prompts)
    assert result.stats.prompt_tokens == sum(map(len, prompts))


def test_the_retained_cache_holds_exactly_the_prompt_and_fed_tokens() -> None:
    """Alias binding really writes in place: slot p of the cache is filled for every fed position p."""
    engine = make_engine(kv.retained_lm(layers=1, heads=1, ctx_len=CTX, last_logits=True), threads=1,
                         cache_binding="alias")
    result = Generator(engine).generate_ids([[4, 2, 9]], max_new_tokens=4)
    key = engine.cache_array("past_key.0")[0, 0]  # [ctx, head_dim]
    fed = 3 + len(result.token_ids[0]) - 1
    assert np.abs(key[:fed]).sum(axis=-1).min() > 0
    assert not key[fed:CTX - 1].any()


# --- sampling -----------------------------------------------------------------------------------


@CASES
@given(form=st.sampled_from(FORMS), prompt=st.lists(st.integers(0, kv.VOCAB - 1), min_size=1, max_size=5),
       seed=st.integers(0, 2**32 - 1), temperature=st.floats(0.3, 3.0))
def test_sampling_repeats_itself_with_the_same_seed(engines, form, prompt, seed, temperature) -> None:
    config = SamplingConfig(temperature=temperature, seed=seed)
    first = Generator(engines[form]).generate_ids([prompt, prompt[::-1]], max_new_tokens=5, sampling=config)
    again = Generator(engines[form]).generate_ids([prompt, prompt[::-1]], max_new_tokens=5, sampling=config)
    assert first.token_ids == again.token_ids


@CASES
@given(prompt=st.lists(st.integers(0, kv.VOCAB - 1), min_size=1, max_size=5), seed=st.integers(0, 2**32 - 1),
       top_k=st.integers(1, 4), top_p=st.sampled_from([None, 0.5, 0.9]))
def test_sampled_tokens_stay_within_top_k_of_the_reference(engines, reference, prompt, seed, top_k, top_p) -> None:
    config = SamplingConfig(temperature=1.5, top_k=top_k, top_p=top_p, seed=seed)
    tokens = Generator(engines["concat"]).generate_ids([prompt], max_new_tokens=5, sampling=config).token_ids[0]
    ids = list(prompt)
    for token in tokens:
        logits = _reference_logits(reference, ids)
        allowed = set(np.argsort(-logits, kind="stable")[:top_k].tolist())
        assert token in allowed
        ids.append(token)
    if top_k == 1:
        assert tokens == _reference_greedy(reference, prompt, 5)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    from qgraph.runtime.generate import TokenSampler

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)[None, :]
    seen = {int(TokenSampler(SamplingConfig(temperature=1.0, top_p=0.75, seed=s))(logits)[0]) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 is the smallest set reaching 0.75; tokens 2 and 3 are never drawn
    assert {int(TokenSampler(SamplingConfig(temperature=1.0, top_p=0.85, seed=s))(logits)[0])
            for s in range(200)} == {0, 1, 2}


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_options_are_bad_input(kwargs) -> None:
    with pytest.raises(BadInputError):
        SamplingConfig(**kwargs)


# --- engine selection -----------------------------------------------------------------------------


def test_a_graph_that_is_not_a_language_model_is_refused() -> None:
    model = kv.no_cache_lm()
    model.graph.output[0].name = "hidden"
    model.graph.node[-1].output[0] = "hidden"
    with pytest.raises(BadInputError, match="not a language-model graph"):
        make_engine(model)


def test_a_symbolic_ctx_len_needs_to_be_given() -> None:
    model = kv.retained_lm(ctx_len=None, last_logits=True)
    with pytest.raises(BadInputError, match="ctx_len is symbolic"):
        make_engine(model)
    assert make_engine(model, ctx_len=12).max_tokens == 11
    assert make_engine(model, specializations=[{"batch_size": 1, "seq_len": 4, "ctx_len": 10},
                                               {"batch_size": 1, "seq_len": 1, "ctx_len": 10}]).default_chunk == 4

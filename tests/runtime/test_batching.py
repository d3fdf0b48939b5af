"""Continuous batching in the runtime: N cache rows kept busy, each request's tokens as it gives alone.

The graph is the kv-cache pass's continuous-batching form of a hand-built
tiny LM (tests/verify/kv_graphs.py); the reference is the same no-cache LM
generating each prompt by itself, greedily.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verify import kv_graphs as kv

from qgraph.errors import BadInputError
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.runtime.batching import serve
from qgraph.runtime.engines import make_engine
from qgraph.runtime.generate import STOP_EOS, Generator

LAYERS, HEADS, CTX, SLOTS = 2, 2, 16, 3


def _cached(**options) -> ir.Model:
    model = ir.from_proto(kv.no_cache_lm(layers=LAYERS, heads=HEADS))
    PassManager(Pipeline([{"pass": "kv-cache", "options": {"style": "retained", "ctx_len": CTX, **options}}])).run(model)
    return model


@pytest.fixture(scope="module")
def batched() -> Generator:
    engine = make_engine(ir.to_proto(_cached(full_batch_size=SLOTS)), threads=1, ctx_len=CTX)
    return Generator(engine, eos_token_ids=[])


@pytest.fixture(scope="module")
def alone() -> Generator:
    return Generator(make_engine(kv.no_cache_lm(layers=LAYERS, heads=HEADS), threads=1), eos_token_ids=[])


prompts = st.lists(st.lists(st.integers(0, kv.VOCAB - 1), min_size=1, max_size=6), min_size=1, max_size=7)


@settings(max_examples=15, deadline=None, database=None)
@given(prompts=prompts, max_new=st.integers(1, 6), budgets=st.lists(st.integers(1, 6), min_size=7, max_size=7))
def test_each_request_gives_its_tokens_alone(batched: Generator, alone: Generator, prompts, max_new, budgets) -> None:
    """More prompts than rows, of different lengths and budgets, so rows are reused mid-decode."""
    eos = {budgets[0] % kv.VOCAB}  # some requests end early on this token, freeing their row
    batched.eos_token_ids = alone.eos_token_ids = frozenset(eos)
    try:
        result = serve(batched, prompts, slots=SLOTS, max_new_tokens=max_new)
        for index, prompt in enumerate(prompts):
            single = alone.generate_ids([prompt], max_new_tokens=max_new)
            assert result.token_ids[index] == single.token_ids[0], f"request {index} {prompt}"
            assert result.stop_reasons[index] == single.stop_reasons[0]
    finally:
        batched.eos_token_ids = alone.eos_token_ids = frozenset()


def test_a_free_row_is_refilled_before_the_next_decode_step(batched: Generator) -> None:
    """Occupancy: with 6 requests of 5 tokens in 3 rows, every decode step runs all 3 rows."""
    result = serve(batched, [[1, 2], [3], [4, 5, 6], [7], [8, 9], [10]], slots=SLOTS, max_new_tokens=5)
    assert [len(t) for t in result.token_ids] == [5] * 6
    assert result.stats.decode_steps == 2 * 4  # two waves of three requests, 4 decode steps each
    assert result.stats.occupancy == 1.0
    assert result.stats.prefill_runs == 6


def test_eos_frees_the_row(batched: Generator) -> None:
    first = serve(batched, [[1, 2, 3]], slots=1, max_new_tokens=4).token_ids[0]
    batched.eos_token_ids = frozenset({first[0]})
    try:
        result = serve(batched, [[1, 2, 3], [4], [5]], slots=1, max_new_tokens=4)
    finally:
        batched.eos_token_ids = frozenset()
    assert result.token_ids[0] == first[:1] and result.stop_reasons[0] == STOP_EOS
    assert result.stats.prefill_runs == 3  # one row: each request entered after the previous one ended


def test_a_graph_without_batch_index_is_refused(alone: Generator) -> None:
    with pytest.raises(BadInputError, match="continuous-batching graph"):
        serve(alone, [[1]], slots=2)


def test_compute_context_lengths_pick_the_shortest_that_fits() -> None:
    """The engine feeds the shortest compiled CCL holding every position of the run; tokens stay the same."""
    model = _cached(comp_ctx_lengths="4,8")
    engine = make_engine(ir.to_proto(model), threads=1, ctx_len=CTX,
                         specializations=[{"batch_size": 1, "seq_len": 1, "ctx_len": CTX, "comp_ctx_lengths": n}
                                          for n in (4, 8)])
    fed = []
    original = engine._serving_feeds

    def spy(batch, positions):
        feeds = original(batch, positions)
        fed.append((int(positions.max()), len(feeds["comp_ctx_lengths"])))
        return feeds

    engine._serving_feeds = spy
    plain = Generator(make_engine(kv.no_cache_lm(layers=LAYERS, heads=HEADS), threads=1))
    tokens = Generator(engine).generate_ids([[1, 2, 3]], max_new_tokens=10).token_ids
    assert tokens == plain.generate_ids([[1, 2, 3]], max_new_tokens=10).token_ids
    assert all(length == next(n for n in (4, 8, CTX) if n > position) for position, length in fed)
    assert {length for _, length in fed} == {4, 8, CTX}


def test_generate_cli_serves_with_full_batch_size(tiny_zoo, tmp_path) -> None:
    """``qgraph generate --full-batch-size`` on the zoo Llama made continuous-batching by ``qgraph optimize``."""
    import io
    import json

    from qgraph.cli import main as cli_main

    export = tiny_zoo.export("llama", "dynamo").output_dir
    out_dir = tmp_path / "cb"
    out_dir.mkdir()
    out = io.StringIO()
    assert cli_main(["optimize", str(export / "model.onnx"), "-o", str(out_dir / "model.onnx"), "--passes", "kv-cache",
                     "--option", "kv-cache.full_batch_size=2", "--option", "kv-cache.ctx_len=24"], out=out) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\ncd\nef\n")
    report = tmp_path / "r.json"
    out = io.StringIO()
    code = cli_main(["generate", str(out_dir / "model.onnx"), "--prompts-file", str(prompts), "--tokenizer",
                     str(export), "--full-batch-size", "2", "--max-new-tokens", "3", "--threads", "1",
                     "--json", str(report)], out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "3 requests in 2 slots" in text
    rows = json.loads(report.read_text())["rows"]
    assert [r["prompt_ids"] for r in rows] == [list(b"ab"), list(b"cd"), list(b"ef")]
    alone = io.StringIO()
    cli_main(["generate", str(export), "--prompt", "ef", "--max-new-tokens", "3", "--threads", "1",
              "--json", str(tmp_path / "alone.json")], out=alone)
    assert rows[2]["token_ids"] == json.loads((tmp_path / "alone.json").read_text())["rows"][0]["token_ids"]

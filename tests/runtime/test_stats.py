"""Latency statistics on a fake clock: the arithmetic, and what the generator records.

The generator's bookkeeping is checked by making every graph run cost a known
amount of fake time: a prefill chunk ``P`` seconds, a decode step ``D``
seconds, tokenizing nothing. Then TTFT, decode time and rates follow by hand.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verify import kv_graphs as kv

from qgraph.runtime.engines import make_engine
from qgraph.runtime.generate import Generator
from qgraph.runtime.stats import LatencyStats, StatsRecorder


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_recorder_arithmetic_on_scripted_times() -> None:
    clock = FakeClock()
    rec = StatsRecorder(clock)  # started at 100.0
    clock.now = 100.5  # tokenizing took 0.5 s
    rec.prefill_start()
    rec.prefill_runs = 2
    clock.now = 100.56
    rec.first_token()
    for t in (100.6, 100.64, 100.68, 100.72):
        clock.now = t
        rec.decode_step()
    clock.now = 100.8
    stats = rec.finish(batch=2, prompt_tokens=14, generated=[5, 3])

    assert stats.ttft == pytest.approx(0.06)
    assert stats.prefill_tokens_per_second == pytest.approx(14 / 0.06)
    assert stats.decode_seconds == pytest.approx(0.16)
    assert stats.generated_tokens == 8 and stats.decode_tokens == 6  # each row's first token came from the prefill
    assert stats.decode_tokens_per_second == pytest.approx(6 / 0.16)
    assert stats.decode_step_ms == pytest.approx(40.0)
    assert stats.end_to_end == pytest.approx(0.8)
    assert stats.total_tokens_per_second == pytest.approx(8 / 0.8)
    assert stats.to_dict()["decode_tokens_per_second"] == pytest.approx(6 / 0.16)


def test_rates_of_nothing_are_zero_and_of_no_time_undefined() -> None:
    stats = LatencyStats(batch=1, prompt_tokens=3, generated_tokens=1, decode_tokens=0, prefill_runs=1,
                         decode_steps=0, ttft=0.0, decode_seconds=0.0, end_to_end=0.0)
    assert stats.decode_tokens_per_second == 0.0
    assert math.isnan(stats.prefill_tokens_per_second)
    assert stats.to_dict()["prefill_tokens_per_second"] is None  # JSON has no NaN
    assert "TTFT" in stats.format()


def test_combined_groups_add_up() -> None:
    a = LatencyStats(1, 4, 3, 2, 1, 2, 0.1, 0.2, 0.4)
    b = LatencyStats(1, 6, 5, 4, 2, 4, 0.3, 0.4, 0.8)
    both = LatencyStats.combine([a, b])
    assert (both.batch, both.prompt_tokens, both.generated_tokens, both.decode_tokens) == (2, 10, 8, 6)
    assert both.decode_tokens_per_second == pytest.approx(6 / 0.6)
    assert both.ttft == pytest.approx(0.4) and both.end_to_end == pytest.approx(1.2)


@settings(max_examples=20, deadline=None, database=None)
@given(prompt_len=st.integers(1, 9), chunk=st.integers(1, 4), new=st.integers(1, 6),
       prefill_cost=st.sampled_from([0.01, 0.03, 0.2]), decode_cost=st.sampled_from([0.02, 0.05]))
def test_generator_times_prefill_chunks_and_decode_steps(prompt_len, chunk, new, prefill_cost, decode_cost) -> None:
    clock = FakeClock()
    engine = make_engine(kv.retained_lm(ctx_len=16, last_logits=True), threads=1)
    real_run = engine._run

    def timed_run(tokens, valid):
        clock.now += prefill_cost if engine.runs < -(-prompt_len // chunk) else decode_cost
        return real_run(tokens, valid)

    engine._run = timed_run
    result = Generator(engine, prefill_chunk=chunk, clock=clock).generate_ids([[3] * prompt_len], max_new_tokens=new)
    stats = result.stats
    chunks = -(-prompt_len // chunk)
    assert stats.prefill_runs == chunks and stats.decode_steps == new - 1
    assert stats.ttft == pytest.approx(chunks * prefill_cost)
    assert stats.decode_seconds == pytest.approx((new - 1) * decode_cost)
    assert stats.end_to_end == pytest.approx(chunks * prefill_cost + (new - 1) * decode_cost)
    assert stats.prefill_tokens_per_second == pytest.approx(prompt_len / (chunks * prefill_cost))
    if new > 1:
        assert stats.decode_tokens_per_second == pytest.approx(1 / decode_cost)

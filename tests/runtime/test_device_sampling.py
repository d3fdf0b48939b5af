"""``qgraph generate`` on a graph that samples on the device (pass ``sampler``).

The graph is the hand-built retained-state LM (tests/verify/kv_graphs.py)
with the sampler appended. Three sequence-level properties:

* greedy settings give exactly the tokens the plain retained graph gives
  (host argmax), for every row of a padded batch;
* with repetition and presence penalties, the tokens are those of a host
  loop that runs the plain graph and applies the numpy reference's
  penalties to seen-token sets it keeps itself (prompt tokens at valid
  positions, then generated ones) -- so the buffers the engine carries
  between steps hold what they must;
* sampling with a seed repeats itself, and the engine refuses a graph
  whose sampler inputs it cannot size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verify import kv_graphs as kv

from qgraph.runtime.engines import make_engine
from qgraph.runtime.generate import Generator, SamplingConfig
from qgraph.runtime.sampling import DevicePenalties, DeviceSamplingEngine
from qgraph_passes.sampler import SamplerPass

sys.path.insert(0, str(Path(__file__).parent.parent / "passes"))
import sampler_reference as ref  # noqa: E402

CTX = 16
CASES = settings(max_examples=15, deadline=None, database=None)


def _sampler_graph(max_top_k: int = 8):
    model = ir.from_proto(kv.retained_lm(layers=2, heads=2, ctx_len=CTX, last_logits=True))
    SamplerPass(max_top_k_ids=max_top_k)(model)
    return ir.to_proto(model)


@pytest.fixture(scope="module")
def engines():
    plain = make_engine(kv.retained_lm(layers=2, heads=2, ctx_len=CTX, last_logits=True), threads=1)
    device = make_engine(_sampler_graph(), threads=1)
    return plain, device


prompts = st.lists(st.lists(st.integers(0, kv.VOCAB - 1), min_size=1, max_size=6), min_size=1, max_size=3)


@CASES
@given(prompt_ids=prompts, new=st.integers(1, 6))
def test_greedy_on_the_device_gives_the_plain_graphs_tokens(engines, prompt_ids, new) -> None:
    plain, device = engines
    assert isinstance(device, DeviceSamplingEngine)
    device.penalties = DevicePenalties()
    want = Generator(plain).generate_ids(prompt_ids, max_new_tokens=new).token_ids
    got = Generator(device).generate_ids(prompt_ids, max_new_tokens=new).token_ids
    assert got == want


def _host_penalized_greedy(plain, prompt_ids: list[list[int]], new: int, rp: float, pp: float) -> list[list[int]]:
    """Greedy with penalties on the host: plain logits, reference penalties, seen sets kept here."""
    out = []
    for prompt in prompt_ids:  # one row at a time: no padding at all on the host side
        plain.start(1)
        logits = plain.prefill(np.array([prompt]), np.ones((1, len(prompt)), bool))[0]
        seen, generated, tokens = set(prompt), set(), []
        for _ in range(new):
            token = int(ref.penalize(logits, seen, generated, rp, pp).argmax())
            tokens.append(token)
            if len(tokens) == new:
                break
            seen.add(token)
            generated.add(token)
            logits = plain.decode(np.array([token]), np.array([True]))[0]
        out.append(tokens)
    return out


@CASES
@given(prompt_ids=prompts, new=st.integers(2, 6), rp=st.sampled_from([1.3, 3.0]), pp=st.sampled_from([0.0, 0.8]))
def test_penalties_read_the_prompt_and_the_generated_tokens(engines, prompt_ids, new, rp, pp) -> None:
    plain, device = engines
    device.penalties = DevicePenalties(repetition_penalty=rp, presence_penalty=pp)
    try:
        got = Generator(device).generate_ids(prompt_ids, max_new_tokens=new).token_ids
    finally:
        device.penalties = DevicePenalties()
    assert got == _host_penalized_greedy(plain, prompt_ids, new, rp, pp)


def test_a_one_token_prompt_is_prefill_not_decode(engines) -> None:
    """A 1-column prefill would read as decode and count the prompt token as generated (presence)."""
    _, device = engines
    Generator(device).generate_ids([[5]], max_new_tokens=1)
    buffers = device.penalty_buffers()
    assert np.flatnonzero(buffers["past_repetition_penalty_buffer"][0]).tolist() == [5]
    assert not buffers["past_presence_penalty_buffer"].any()


def test_seeded_sampling_on_the_device_repeats_itself(engines) -> None:
    _, device = engines
    sampling = SamplingConfig(temperature=1.5, top_k=6, top_p=0.9, seed=7)
    runs = [Generator(device).generate_ids([[1, 2, 3], [4]], max_new_tokens=8, sampling=sampling).token_ids
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = Generator(device).generate_ids([[1, 2, 3], [4]], max_new_tokens=8,
                                           sampling=SamplingConfig(temperature=1.5, top_k=6, top_p=0.9, seed=8))
    assert other.token_ids != runs[0]  # the random numbers do reach the graph


def test_penalty_flags_are_refused_for_a_graph_that_samples_on_the_host(engines) -> None:
    import argparse

    from qgraph.errors import BadInputError
    from qgraph.runtime.command import _device_penalties

    plain, device = engines
    args = argparse.Namespace(repetition_penalty=1.4, presence_penalty=None, min_p=0.1)
    with pytest.raises(BadInputError, match="--repetition-penalty, --min-p: only for a graph that samples on the device"):
        _device_penalties(args, plain)
    try:
        _device_penalties(args, device)
        assert device.penalties == DevicePenalties(repetition_penalty=1.4, min_p=0.1)
    finally:
        device.penalties = DevicePenalties()

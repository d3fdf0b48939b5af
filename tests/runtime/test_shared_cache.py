"""The lowered (GroupQueryAttention) graph generates with one shared past/present buffer, as the concat graph does.

``qgraph generate`` picks :class:`SharedCacheEngine` for a ``lower-gqa``
graph: past and present bound to the same OrtValue, grown by doubling. Its
greedy tokens and every step's logits must be the concat graph's (the
``ort`` preset without the lowering) for drawn prompts, left-padded batches
(``mask=bias``) whose finished rows are fed as padding, chunkings, a further
turn after the decode steps, and buffer sizes small enough to make the
buffers grow mid-generation.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph import io
from qgraph.demo import run_preset
from qgraph.errors import BadInputError
from qgraph.manager import PassManager
from qgraph.registry import default_registry
from qgraph.runtime.engines import ConcatEngine, make_engine
from qgraph.runtime.generate import Generator, load_generator
from qgraph.runtime.shared_cache import SharedCacheEngine

VOCAB = 256


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def graphs(request, tiny_zoo, tmp_path_factory):
    """{"concat", "bias", "none"}: a tiny decoder's ort-attention graph, and lower-gqa's with mask=bias / mask=none."""
    out = tmp_path_factory.mktemp(f"shared-{request.param}")
    run = run_preset("ort-attention", tiny_zoo.export(request.param, "dynamo").output_dir, out, default_registry())
    paths = {"concat": run.folder / "model.onnx"}
    for mask in ("bias", "none"):
        model = io.load(paths["concat"])
        PassManager([("lower-gqa", {"mask": mask})]).run(model)
        paths[mask] = out / f"gqa-{mask}.onnx"
        io.save(model, paths[mask])
    return paths


def test_the_engine_is_chosen_from_the_graph(graphs) -> None:
    engines = {kind: make_engine(path, threads=1) for kind, path in graphs.items()}
    assert type(engines["concat"]) is ConcatEngine and engines["concat"].fixed_batch is None
    assert isinstance(engines["bias"], SharedCacheEngine) and engines["bias"].fixed_batch is None
    assert isinstance(engines["none"], SharedCacheEngine) and engines["none"].fixed_batch == 1


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_shared_buffer_gives_the_concat_graphs_logits(graphs, data) -> None:
    mask = data.draw(st.sampled_from(["bias", "none"]), label="lowered with mask")
    concat = make_engine(graphs["concat"], threads=1)
    shared = make_engine(graphs[mask], threads=1)
    shared.first_capacity = data.draw(st.integers(1, 8), label="first capacity")  # grow while generating
    batch = data.draw(st.integers(1, 3), label="batch") if mask == "bias" else 1
    width = data.draw(st.integers(1, 12), label="prompt width")
    lengths = [data.draw(st.integers(1, width), label="prompt length") if mask == "bias" else width
               for _ in range(batch)]  # mask=none: unpadded rows only
    prompt = np.asarray(data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=batch * width,
                                           max_size=batch * width))).reshape(batch, width)
    valid = np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]  # left padding, as generate pads
    chunk = data.draw(st.integers(1, width), label="prefill chunk")
    steps = data.draw(st.integers(1, 10), label="decode steps")
    for engine in (concat, shared):
        engine.start(batch)
    want = concat.prefill(prompt, valid, chunk)
    got = shared.prefill(prompt, valid, chunk)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    for step in range(steps):
        token = np.argmax(want, axis=-1)
        assert (np.argmax(got, axis=-1) == token).all()
        # a finished row is fed as padding (not valid), as generate feeds it; every row's logits must agree
        active = np.asarray(data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch), label=f"active {step}")
                            if mask == "bias" else [True])
        want = concat.decode(token, active)
        got = shared.decode(token, active)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # a further turn: a wider step after one-column ones, then one-column steps again (a chat's next message)
    more = data.draw(st.integers(2, 4), label="next turn's width")
    turn = np.asarray(data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=batch * more, max_size=batch * more),
                                label="next turn")).reshape(batch, more)
    want = concat.prefill(turn, np.ones(turn.shape, bool))
    got = shared.prefill(turn, np.ones(turn.shape, bool))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    for _ in range(2):
        token = np.argmax(want, axis=-1)
        want = concat.decode(token, np.ones(batch, bool))
        got = shared.decode(token, np.ones(batch, bool))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    steps += more + 2
    assert shared.capacity >= width + steps
    # the buffer holds what the concat graph's present holds, slot for slot
    name = shared.layout.past[0][0]
    np.testing.assert_allclose(shared.cache_array(name), concat._past[name].numpy(), atol=1e-5)


@pytest.mark.parametrize("mask", ["bias", "none"])
def test_several_prompts_generate_the_concat_graphs_tokens(graphs, mask) -> None:
    """mask=bias: one padded batch, as the concat graph; mask=none: one prompt after another."""
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    concat = Generator(make_engine(graphs["concat"], threads=1), None, [])
    shared = Generator(make_engine(graphs[mask], threads=1), None, [])
    expected = concat.generate_ids(prompts, max_new_tokens=8)  # a padded batch of three
    got = shared.generate_ids(prompts, max_new_tokens=8)
    assert got.token_ids == expected.token_ids


def test_padding_and_overlong_rows_are_refused(graphs) -> None:
    shared = make_engine(graphs["none"], threads=1)
    with pytest.raises(BadInputError, match="fixed at 1"):
        shared.start(2)
    shared.start(1)
    with pytest.raises(BadInputError, match="unpadded"):
        shared.prefill(np.array([[4, 5]]), np.array([[False, True]]))
    shared.max_tokens = 4
    shared.start(1)
    with pytest.raises(BadInputError, match="at most 4 positions"):
        shared.prefill(np.array([[4, 5, 6, 7, 8]]), np.ones((1, 5), bool))


def test_generate_command_on_the_lowered_preset(tiny_zoo, tmp_path) -> None:
    """``--preset ort`` (GroupQueryAttention) through the generator the CLI uses: the no-cache export's tokens, prompt by prompt."""
    export_dir = tiny_zoo.export("llama", "dynamo").output_dir
    prompts = ["Hello world, a prompt", "a", "KV"]
    expected = load_generator(export_dir, threads=1).generate(prompts, max_new_tokens=10).token_ids
    run = run_preset("ort", export_dir, tmp_path, default_registry())
    generator = load_generator(run.folder, threads=1)
    assert isinstance(generator.engine, SharedCacheEngine)
    assert generator.generate(prompts, max_new_tokens=10).token_ids == expected


def test_a_decode_steps_logits_are_not_overwritten_by_the_next_step(graphs) -> None:
    """Decode logits come out of one reused buffer; what a step returned must stay what it computed."""
    shared = make_engine(graphs["bias"], threads=1)
    concat = make_engine(graphs["concat"], threads=1)
    prompt = np.array([[4, 5, 6]])
    for engine in (shared, concat):
        engine.start(1)
        engine.prefill(prompt, np.ones(prompt.shape, bool))
    steps = [(shared.decode(np.array([t]), np.ones(1, bool)), concat.decode(np.array([t]), np.ones(1, bool)))
             for t in (7, 8, 9)]
    for got, want in steps:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_second_generation_on_kept_buffers_equals_a_fresh_engine(graphs, data) -> None:
    """Buffers are kept between generations of one batch size: stale slots from the first must not show."""
    kept = make_engine(graphs["bias"], threads=1)
    kept.first_capacity = data.draw(st.integers(1, 8), label="first capacity")
    long_prompt = np.array([data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=6, max_size=12), label="first")])
    short_prompt = np.array([data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=5), label="second")])
    kept.start(1)
    kept.prefill(long_prompt, np.ones(long_prompt.shape, bool))
    for t in (5, 6, 7):
        kept.decode(np.array([t]), np.ones(1, bool))
    fresh = make_engine(graphs["bias"], threads=1)
    outputs = []
    for engine in (kept, fresh):
        engine.start(1)
        steps = [engine.prefill(short_prompt, np.ones(short_prompt.shape, bool))]
        steps += [engine.decode(np.array([t]), np.ones(1, bool)) for t in (9, 10)]
        outputs.append(steps)
    for got, want in zip(*outputs):
        np.testing.assert_array_equal(got, want)

"""The lowered (GroupQueryAttention) graph generates with one shared past/present buffer, as the concat graph does.

``qgraph generate`` picks :class:`SharedCacheEngine` for a ``lower-gqa``
graph: past and present bound to the same OrtValue, grown by doubling. Its
greedy tokens and every step's logits must be the concat graph's (the
``ort`` preset without the lowering) for drawn prompts, chunkings and
buffer sizes small enough to make the buffers grow mid-generation.
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
    """(concat graph, lowered graph) of a tiny decoder, dynamo export, ort preset."""
    out = tmp_path_factory.mktemp(f"shared-{request.param}")
    run = run_preset("ort", tiny_zoo.export(request.param, "dynamo").output_dir, out, default_registry())
    model = io.load(run.folder / "model.onnx")
    PassManager(["lower-gqa"]).run(model)
    lowered = out / "gqa"
    lowered.mkdir()
    io.save(model, lowered / "model.onnx")
    return run.folder / "model.onnx", lowered / "model.onnx"


def test_the_engine_is_chosen_from_the_graph(graphs) -> None:
    concat, lowered = (make_engine(path, threads=1) for path in graphs)
    assert type(concat) is ConcatEngine and isinstance(lowered, SharedCacheEngine)
    assert lowered.fixed_batch == 1 and concat.fixed_batch is None


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_shared_buffer_gives_the_concat_graphs_logits(graphs, data) -> None:
    concat = make_engine(graphs[0], threads=1)
    shared = make_engine(graphs[1], threads=1)
    shared.first_capacity = data.draw(st.integers(1, 8), label="first capacity")  # grow while generating
    length = data.draw(st.integers(1, 12), label="prompt length")
    prompt = np.asarray(data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length)))[None]
    chunk = data.draw(st.integers(1, length), label="prefill chunk")
    steps = data.draw(st.integers(1, 10), label="decode steps")
    for engine in (concat, shared):
        engine.start(1)
    want = concat.prefill(prompt, np.ones_like(prompt, bool), chunk)
    got = shared.prefill(prompt, np.ones_like(prompt, bool), chunk)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    for _ in range(steps):
        token = np.argmax(want, axis=-1)
        assert (np.argmax(got, axis=-1) == token).all()
        want = concat.decode(token, np.ones(1, bool))
        got = shared.decode(token, np.ones(1, bool))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert shared.capacity >= length + steps
    # the buffer holds what the concat graph's present holds, position for position
    name = shared.layout.past[0][0]
    np.testing.assert_allclose(shared.cache_array(name), concat._past[name].numpy(), atol=1e-5)


def test_several_prompts_generate_one_after_another(graphs) -> None:
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    concat = Generator(make_engine(graphs[0], threads=1), None, [])
    shared = Generator(make_engine(graphs[1], threads=1), None, [])
    expected = concat.generate_ids(prompts, max_new_tokens=8)  # a padded batch of three
    got = shared.generate_ids(prompts, max_new_tokens=8)  # three batches of one
    assert got.token_ids == expected.token_ids


def test_padding_and_overlong_rows_are_refused(graphs) -> None:
    shared = make_engine(graphs[1], threads=1)
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
    """``--preset ort-gqa`` through the generator the CLI uses: the no-cache export's tokens, prompt by prompt."""
    export_dir = tiny_zoo.export("llama", "dynamo").output_dir
    prompts = ["Hello world, a prompt", "a", "KV"]
    expected = load_generator(export_dir, threads=1).generate(prompts, max_new_tokens=10).token_ids
    run = run_preset("ort-gqa", export_dir, tmp_path, default_registry())
    generator = load_generator(run.folder, threads=1)
    assert isinstance(generator.engine, SharedCacheEngine)
    assert generator.generate(prompts, max_new_tokens=10).token_ids == expected

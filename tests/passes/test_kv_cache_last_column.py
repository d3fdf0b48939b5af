"""kv-cache ``logits=last`` on the concat form: the LM head runs on the chunk's last column only.

Generation reads one token's logits per row, and the LM head (hidden x
vocab) is the largest matmul of a small model, so the concat graph can take
``hidden[:, -1:, :]`` before the head, as Hugging Face's ``logits_to_keep=1``
does. Its rows are left-padded (the concat contract), so that column is
each row's last token of every chunk. What is checked here, on every tiny
zoo decoder from both exporters:

* the graph: logits [batch, 1, vocab], the head reads the sliced column;
* the replay (docs/design.md's property): at every step of drawn
  generations the last column gives the no-cache graph's logits;
* the same logits as ``logits=all`` at each row's last valid token, at every
  step of a drawn generation (prompt lengths, left padding, chunks, batch);
* the runtime: ``ConcatEngine`` gives the same prefill and decode logits as
  with ``logits=all`` whatever the prompt's padding side and chunking;
* a wrong gather (the first column) fails the replay and ``--verify``.
"""

from __future__ import annotations

import io
from pathlib import Path

import hypothesis
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from qgraph import io as qio
from qgraph.cli import main
from qgraph.export.zoo import TINY_ARCHS
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.runtime.engines import ConcatEngine, left_aligned, make_engine
from qgraph.verify.cache_steps import initial_state, next_state, step_feeds
from qgraph.verify.kv_contract import detect_kv_layout
from qgraph.verify.runner import OrtRunner
from qgraph.verify.sequence import check_sequence_equivalence, replay_cases

DECODERS = [name for name, arch in TINY_ARCHS.items() if arch.task == "causal-lm"]
EXPORTERS = ("dynamo", "torchscript")
MAX_LEN = 9
SETTINGS = hypothesis.settings(max_examples=6, deadline=None, database=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class ConcatGraphs:
    """The concat form of a zoo export with ``logits=last`` and ``logits=all``, made once per session."""

    def __init__(self, zoo, folder: Path) -> None:
        self.zoo, self.folder = zoo, folder
        self._done: dict[tuple[str, str, str], tuple[Path, list[str]]] = {}

    def reference(self, arch: str, exporter: str) -> Path:
        return Path(self.zoo.export(arch, exporter).model_path)

    def get(self, arch: str, exporter: str, logits: str) -> tuple[Path, list[str]]:
        key = (arch, exporter, logits)
        if key not in self._done:
            model = qio.load(self.reference(arch, exporter))
            options = {"style": "concat", "logits": logits}
            report = PassManager(Pipeline([{"pass": "kv-cache", "options": options}])).run(model)
            out = self.folder / f"{arch}-{exporter}-{logits}" / "model.onnx"
            out.parent.mkdir(parents=True)
            qio.save(model, out)
            notes = [n for r in report.passes if r.name == "kv-cache" for n in r.notes]
            self._done[key] = (out, notes)
        return self._done[key]


@pytest.fixture(scope="session")
def concat_graphs(tiny_zoo, tmp_path_factory) -> ConcatGraphs:
    return ConcatGraphs(tiny_zoo, tmp_path_factory.mktemp("concat-last-column"))


def _close(want: np.ndarray, got: np.ndarray, what: str) -> None:
    """fp32 logits of the same computation on fewer rows: within 1e-4 scaled by their magnitude."""
    atol = 1e-4 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=what)


# --- the graph ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", DECODERS)
def test_last_column_replays_like_the_no_cache_graph(concat_graphs: ConcatGraphs, arch: str, exporter: str) -> None:
    """At every step of drawn generations (left padding, chunks, decode steps) the chunk's last column gives the
    no-cache logits and greedy token of each row's last token."""
    path, notes = concat_graphs.get(arch, exporter, "last")
    layout = detect_kv_layout(qio.load(path))
    assert layout.style == "concat" and layout.logits_seq == 1 and layout.last_column_logits
    result = check_sequence_equivalence(path, concat_graphs.reference(arch, exporter), examples=8, max_len=MAX_LEN,
                                        require_greedy=True)
    assert result.equivalent, f"{result}\npass notes: {notes}"
    assert any("chunk's last column" in n for n in notes), notes


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_the_lm_head_reads_one_column(concat_graphs: ConcatGraphs, arch: str, exporter: str) -> None:
    """The head MatMul (through gemma2's final soft-cap, gpt2's tied embedding) takes hidden[:, -1:, :]."""
    path, notes = concat_graphs.get(arch, exporter, "last")
    graph = qio.load(path).graph
    logits = next(o for o in graph.outputs if o.name == "logits")
    assert logits.shape[1] == 1
    value = logits
    while (node := value.producer()).op_type != "MatMul":
        value = next(x for x in node.inputs if x is not None and x.const_value is None and x.producer() is not None)
    sliced = node.inputs[0].producer()
    assert sliced.op_type == "Slice", f"the head reads {sliced.op_type}; notes {notes}"
    starts, ends, axes = (sliced.inputs[i].const_value.numpy().tolist() for i in (1, 2, 3))
    assert (starts, axes) == ([-1], [1]) and ends[0] >= 2**62


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", DECODERS)
def test_last_column_equals_every_position_logits_at_each_rows_last_token(concat_graphs: ConcatGraphs, arch: str,
                                                                          exporter: str) -> None:
    """Both graphs fed the same drawn generation step by step: logits=last at every step equals logits=all at each
    row's last valid column of the chunk, and the caches they hand on are the same."""
    last_path, _ = concat_graphs.get(arch, exporter, "last")
    all_path, _ = concat_graphs.get(arch, exporter, "all")
    last_model, all_model = qio.load(last_path), qio.load(all_path)
    layout = detect_kv_layout(last_model)
    vocab = layout.vocab
    with OrtRunner(last_model, label="logits=last") as last_run, OrtRunner(all_model, label="logits=all") as all_run:

        @SETTINGS
        @given(case=replay_cases(vocab, MAX_LEN, 3, padding="left"))
        def check(case) -> None:
            state_last = state_all = initial_state(layout, case.batch, None)
            past = 0
            for start, stop in case.steps():
                feeds_last, fed = step_feeds(layout, case, start, stop, state_last)
                feeds_all, _ = step_feeds(layout, case, start, stop, state_all)
                out_last, out_all = last_run.run(feeds_last), all_run.run(feeds_all)
                assert out_last["logits"].shape == (case.batch, 1, vocab)
                assert out_all["logits"].shape == (case.batch, stop - start, vocab)
                for b in range(case.batch):
                    columns = np.flatnonzero(case.valid[b, start:stop])
                    if columns.size:
                        _close(out_all["logits"][b, columns[-1]], out_last["logits"][b, 0],
                               f"row {b}, step columns {start}:{stop}, {case.describe()}")
                state_last = next_state(layout, out_last, state_last, past, fed)
                state_all = next_state(layout, out_all, state_all, past, fed)
                for name in state_last:
                    np.testing.assert_array_equal(state_last[name], state_all[name], err_msg=name)
                past += fed

        check()


# --- the runtime -------------------------------------------------------------------------------------


@st.composite
def _prompts(draw, vocab: int):
    """A batch of prompts (1..3 rows of 1..7 tokens), padded on a drawn side, and a prefill chunk length."""
    lengths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    width = max(lengths)
    side = draw(st.sampled_from(("left", "right")))
    seed = draw(st.integers(0, 2**32 - 1))
    tokens = np.random.default_rng(seed).integers(0, vocab, (len(lengths), width))
    cols = np.arange(width)[None]
    n = np.asarray(lengths)[:, None]
    valid = cols >= width - n if side == "left" else cols < n
    chunk = draw(st.integers(1, width))
    return np.where(valid, tokens, 0), valid, chunk


def test_left_aligned_moves_padding_before_each_rows_tokens() -> None:
    tokens = np.array([[5, 6, 7, 0], [0, 0, 8, 9], [1, 0, 2, 0]])
    moved, valid = left_aligned(tokens, tokens > 0)
    np.testing.assert_array_equal(moved, [[0, 5, 6, 7], [0, 0, 8, 9], [0, 0, 1, 2]])
    np.testing.assert_array_equal(valid, moved > 0)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_engine_gives_the_same_logits_as_every_position_graph(concat_graphs: ConcatGraphs, arch: str,
                                                              exporter: str) -> None:
    """ConcatEngine on the logits=last graph: prefill (any padding side, any chunk) and decode logits of each row
    equal the logits=all graph's on the prompt left-padded, Hugging Face's rule (right padding would leave a hole
    before the decoded tokens, which a sliding window counted in columns, gemma2's, sees differently)."""
    last = make_engine(concat_graphs.get(arch, exporter, "last")[0], threads=1)
    every = make_engine(concat_graphs.get(arch, exporter, "all")[0], threads=1)
    assert isinstance(last, ConcatEngine) and last.layout.last_column_logits
    assert not every.layout.last_column_logits
    vocab = last.layout.vocab

    @SETTINGS
    @given(drawn=_prompts(vocab))
    def check(drawn) -> None:
        tokens, valid, chunk = drawn
        batch = tokens.shape[0]
        every.start(batch)
        as_padded = every.prefill(tokens, valid, chunk)
        last.start(batch)
        every.start(batch)
        got, want = last.prefill(tokens, valid, chunk), every.prefill(*left_aligned(tokens, valid), chunk)
        assert got.shape == want.shape == (batch, vocab)
        _close(want, got, f"prefill, chunk {chunk}, valid {valid.astype(int).tolist()}")
        _close(as_padded, got, "prefill on the prompt as padded")
        for step in range(2):
            feed = want.argmax(axis=-1)
            active = np.arange(batch) != step  # a finished row is fed padding
            got, want = last.decode(feed, active), every.decode(feed, active)
            for b in np.flatnonzero(active):
                _close(want[b], got[b], f"decode step {step}, row {b}")

    check()


# --- a wrong gather is caught ------------------------------------------------------------------------


def _first_column(self, hidden):
    """A deliberately wrong gather: the chunk's first column instead of its last."""
    return self.op("Slice", hidden, self.const([0]), self.const([1]), self.const([1]))


def test_a_first_column_gather_fails_the_replay(concat_graphs: ConcatGraphs, monkeypatch, tmp_path) -> None:
    from qgraph_passes.kv_cache.build import GraphBuilder

    monkeypatch.setattr(GraphBuilder, "last_column", _first_column)
    reference = concat_graphs.reference("llama", "dynamo")
    model = qio.load(reference)
    PassManager(Pipeline([{"pass": "kv-cache", "options": {"style": "concat", "logits": "last"}}])).run(model)
    qio.save(model, tmp_path / "model.onnx")
    result = check_sequence_equivalence(tmp_path / "model.onnx", reference, examples=8, max_len=MAX_LEN)
    assert not result.equivalent
    failed = [s for s in result.result.steps if not s.passed]
    assert failed and all(s.logits_at == "last column" for s in failed), str(result)


@pytest.mark.parametrize("wrong", [False, True])
def test_verify_of_the_concat_last_column(concat_graphs: ConcatGraphs, monkeypatch, tmp_path, wrong: bool) -> None:
    """``qgraph optimize --passes kv-cache --option kv-cache.logits=last --verify``: exit 0, or 1 with the wrong
    gather (and nothing written)."""
    from qgraph_passes.kv_cache.build import GraphBuilder

    if wrong:
        monkeypatch.setattr(GraphBuilder, "last_column", _first_column)
    out = tmp_path / "out.onnx"
    text = io.StringIO()
    code = main(["optimize", str(concat_graphs.reference("llama", "dynamo")), "-o", str(out), "--passes", "kv-cache",
                 "--option", "kv-cache.style=concat", "--option", "kv-cache.logits=last", "--verify"], out=text)
    if wrong:
        assert code == 1, text.getvalue()
        assert not out.exists()
    else:
        assert code == 0, text.getvalue()
        assert detect_kv_layout(qio.load(out)).last_column_logits


# --- options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["ort", "ort-int8", "ort-int4"])
def test_the_ort_presets_run_the_lm_head_on_the_last_column(tiny_zoo, preset: str) -> None:
    """The ort presets set logits=last: the head (MatMul, or MatMulNBits once quantized) reads one column."""
    from qgraph.registry import default_registry

    registry = default_registry()
    model = qio.load(tiny_zoo.export("llama", "dynamo").model_path)
    PassManager(Pipeline.from_preset(preset, registry), registry=registry).run(model)
    assert detect_kv_layout(model).last_column_logits
    heads = [n for n in model.graph if n.op_type in ("MatMul", "MatMulNBits")
             and any(o.is_graph_output() and o.name == "logits" for o in n.outputs)]
    assert len(heads) == 1 and heads[0].inputs[0].producer().op_type == "Slice"


def test_concat_keeps_every_position_by_default(concat_graphs: ConcatGraphs) -> None:
    """Backward compatible: without the option the concat form returns logits [batch, seq, vocab]."""
    model = qio.load(concat_graphs.reference("llama", "dynamo"))
    PassManager(Pipeline([{"pass": "kv-cache", "options": {"style": "concat"}}])).run(model)
    logits = next(o for o in model.graph.outputs if o.name == "logits")
    assert str(logits.shape[1]) == "sequence_length"
    assert not detect_kv_layout(model).last_column_logits


def test_a_budget_check_reads_the_last_column_graph_through_its_cache(concat_graphs: ConcatGraphs) -> None:
    """quantize's --verify reads a decoder teacher-forced: a last-column graph, stepped through its own cache, scores
    the text exactly as the every-position graph does (all greedy tokens equal, the same perplexity)."""
    from qgraph.verify.budget import Budget, check_budget

    every, _ = concat_graphs.get("llama", "dynamo", "all")
    last, _ = concat_graphs.get("llama", "dynamo", "last")
    verdict = check_budget(every, last, Budget(token_agreement=1.0, perplexity_rise=1e-5))
    assert verdict.kind == "decoder" and verdict.within, str(verdict)
    assert verdict.agreement == 1.0 and abs(verdict.perplexity_rise) < 1e-5

"""Greedy speculative decoding gives exactly the target's own greedy tokens, whatever the draft proposes.

The target is a tiny zoo decoder through ``kv-cache`` with
``num_speculative_tokens``; drafts: the target itself (every proposal is
right: all accepted), another random model over the same vocabulary (nearly
all rejected: the roll-back path), and the target truncated to its first
layer (``truncate-layers``, in between). Hypothesis draws the prompts (a
padded batch), K and the length; the reference is plain greedy decoding with
the same target graph. A generator that forgets to roll back must fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph import io as qio
from qgraph.errors import BadInputError
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.runtime.engines import RetainedEngine, make_engine
from qgraph.runtime.generate import Generator
from qgraph.runtime.speculative import SpeculativeGenerator

CTX_LEN = 24
VOCAB = 256
_graphs: dict[tuple, Path] = {}


def _graph(tiny_zoo, folder: Path, arch: str, *, truncate: int | None = None, **options) -> Path:
    options = {"style": "retained", "ctx_len": CTX_LEN, **options}
    key = (arch, truncate, tuple(sorted(options.items())))
    if key not in _graphs:
        model = qio.load(Path(tiny_zoo.export(arch, "dynamo").model_path))
        steps = ([{"pass": "truncate-layers", "options": {"layers": truncate}}] if truncate else [])
        PassManager(Pipeline([*steps, {"pass": "kv-cache", "options": options}])).run(model)
        out = folder / f"{arch}-{len(_graphs)}" / "model.onnx"
        out.parent.mkdir(parents=True)
        qio.save(model, out)
        _graphs[key] = out
    return _graphs[key]


@pytest.fixture(scope="module")
def graphs(tiny_zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("speculative")
    target = _graph(tiny_zoo, folder, "llama", num_speculative_tokens=4)
    return {
        "target": target,
        "self": target,
        "other": _graph(tiny_zoo, folder, "qwen2"),
        "first-layer": _graph(tiny_zoo, folder, "llama", truncate=1),
    }


def _engine(path: Path) -> RetainedEngine:
    engine = make_engine(path, threads=1)
    assert isinstance(engine, RetainedEngine)
    return engine


@pytest.fixture(scope="module")
def engines(graphs):
    return {name: _engine(path) for name, path in graphs.items()}


prompts_strategy = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prompts=prompts_strategy, k=st.integers(0, 5), new=st.integers(1, 12),
       draft=st.sampled_from(["self", "other", "first-layer"]))
def test_speculative_tokens_equal_plain_greedy_tokens(engines, prompts, k, new, draft) -> None:
    plain = Generator(engines["target"]).generate_ids(prompts, max_new_tokens=new).token_ids
    spec = SpeculativeGenerator(engines["target"], engines[draft], k)
    got = spec.generate_ids(prompts, max_new_tokens=new).token_ids
    assert got == plain
    stats = spec.speculation
    assert stats.accepted <= stats.proposed
    if draft == "self" and k:
        assert stats.accepted == stats.proposed  # the target agrees with itself


def test_a_draft_that_is_the_target_accepts_everything_and_saves_runs(engines) -> None:
    prompts = [[5, 6, 7], [9]]
    spec = SpeculativeGenerator(engines["target"], engines["self"], 4)
    result = spec.generate_ids(prompts, max_new_tokens=11)
    assert [len(t) for t in result.token_ids] == [11, 11]
    # 1 token from the prefill, then rounds of K+1 = 5: 2 rounds instead of 10 decode steps.
    assert spec.speculation.rounds == 2 and spec.speculation.acceptance_rate == 1.0


def test_an_unrelated_draft_is_mostly_rejected_and_still_gives_the_target_tokens(engines) -> None:
    prompts = [[1, 2, 3, 4]]
    plain = Generator(engines["target"]).generate_ids(prompts, max_new_tokens=12).token_ids
    spec = SpeculativeGenerator(engines["target"], engines["other"], 3)
    assert spec.generate_ids(prompts, max_new_tokens=12).token_ids == plain
    assert spec.speculation.accepted < spec.speculation.proposed  # rejections happened: the roll-back ran


def test_the_context_limit_is_respected(engines) -> None:
    """Near the last slot K shrinks; the row stops for the context exactly where plain decoding does."""
    prompts = [[3] * 20]
    plain = Generator(engines["target"]).generate_ids(prompts, max_new_tokens=50)
    spec = SpeculativeGenerator(engines["target"], engines["first-layer"], 5).generate_ids(prompts, max_new_tokens=50)
    assert spec.token_ids == plain.token_ids and spec.stop_reasons == plain.stop_reasons == ["context"]


def test_without_roll_back_the_tokens_differ(engines, monkeypatch) -> None:
    """The check can fail: a generator whose engines never forget rejected tokens gives other tokens."""
    prompts = [[1, 2, 3, 4], [7, 8]]
    plain = Generator(engines["target"]).generate_ids(prompts, max_new_tokens=5).token_ids
    monkeypatch.setattr(RetainedEngine, "rewind", lambda self, seen: None)
    spec = SpeculativeGenerator(engines["target"], engines["other"], 2)
    got = spec.generate_ids(prompts, max_new_tokens=5).token_ids  # short: positions stay inside the cache
    assert spec.speculation.accepted < spec.speculation.proposed  # rejected tokens were left visible
    assert got != plain


def test_bad_pairs_are_refused(engines, graphs, tiny_zoo) -> None:
    with pytest.raises(BadInputError, match="last token's logits only"):
        SpeculativeGenerator(engines["other"], engines["target"], 3)
    plain = make_engine(Path(tiny_zoo.export("llama", "dynamo").model_path), threads=1)
    with pytest.raises(BadInputError, match="retained-state"):
        SpeculativeGenerator(engines["target"], plain, 3)
    with pytest.raises(BadInputError, match="greedy only"):
        from qgraph.runtime.generate import SamplingConfig

        SpeculativeGenerator(engines["target"], engines["self"], 2).generate_ids(
            [[1]], max_new_tokens=2, sampling=SamplingConfig(temperature=0.7, seed=1))


def test_rewind_only_goes_back(engines) -> None:
    engine = engines["other"]
    engine.start(1)
    engine.prefill(np.array([[1, 2, 3]]), np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="only back"):
        engine.rewind(np.array([4]))
    engine.rewind(np.array([1]))
    assert engine.seen.tolist() == [1]


def test_generate_cli_with_a_draft_prints_acceptance_and_the_plain_tokens(tiny_zoo, graphs, tmp_path, capsys) -> None:
    import io
    import json
    import shutil

    from qgraph.cli import main

    export = Path(tiny_zoo.export("llama", "dynamo").output_dir)
    target = tmp_path / "target"
    shutil.copytree(graphs["target"].parent, target)
    reports = {}
    for name, extra in (("plain", []), ("spec", ["--draft", graphs["first-layer"].parent, "--speculative-tokens", 3])):
        out = io.StringIO()
        reports[name] = tmp_path / f"{name}.json"
        code = main([str(a) for a in ("generate", target, "--tokenizer", export, "--prompt", "Once upon",
                                      "--max-new-tokens", 10, "--threads", 1, "--json", reports[name], *extra)],
                    out=out)
        assert code == 0, capsys.readouterr().err
        if name == "spec":
            assert "speculative (K=3): acceptance" in out.getvalue()
    plain, spec = (json.loads(reports[n].read_text()) for n in ("plain", "spec"))
    assert spec["rows"][0]["token_ids"] == plain["rows"][0]["token_ids"]
    assert spec["speculative"]["k"] == 3 and spec["speculative"]["proposed"] > 0


def test_generate_cli_refuses_a_concat_draft_with_exit_2(tiny_zoo, graphs, capsys) -> None:
    from qgraph.cli import main

    export = Path(tiny_zoo.export("llama", "dynamo").output_dir)
    code = main(["generate", str(graphs["target"].parent), "--tokenizer", str(export), "--prompt", "a",
                 "--draft", str(export)])
    assert code == 2
    assert "retained-state" in capsys.readouterr().err

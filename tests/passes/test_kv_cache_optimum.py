"""The kv-cache pass on graphs optimum-onnx exported with a concat cache (tests/data/optimum-onnx-0.1).

``optimum-cli export onnx --task text-generation-with-past`` (transformers
4.57) gives graphs that already have a cache: past_key_values.N.key/value
in, present.N.key/value out. Gemma, Gemma-2 and BLOOM take no position_ids
and read the past length from the cache's shape (``cache_position`` starts
at it; the masks count keys with it), so the pass must read them as the
no-cache graphs they are when the past is empty, and leave nothing that
reads the old cache. The reference of the replay is the optimum graph
itself, run with its own cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qgraph import io as qio
from qgraph.cli import main
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.verify.sequence import check_sequence_equivalence

OPTIMUM = Path(__file__).resolve().parent.parent / "data" / "optimum-onnx-0.1"
CTX_LEN = 12  # sequences of up to 11 tokens: longer than gemma2's window of 4
EXAMPLES = 8


@pytest.mark.parametrize("style", ["retained", "concat"])
@pytest.mark.parametrize("name", ["gemma", "gemma2", "bloom"])
def test_optimum_exports_that_read_the_past_length_replay(tmp_path: Path, name: str, style: str) -> None:
    """The past length read from Shape(past_key_values.0.key) becomes position_ids and the rebuilt masks."""
    reference = OPTIMUM / name / "model.onnx"
    model = qio.load(reference)
    options = {"style": style, **({"ctx_len": CTX_LEN, "logits": "all"} if style == "retained" else {})}
    PassManager(Pipeline([{"pass": "kv-cache", "options": options}])).run(model)
    old_cache = {v.name for v in qio.load(reference).graph.inputs if v.name.startswith("past_key_values.")}
    if style == "retained":
        assert not old_cache & {v.name for v in model.graph.inputs}
    out = tmp_path / "model.onnx"
    qio.save(model, out)
    result = check_sequence_equivalence(out, reference, examples=EXAMPLES, require_greedy=True, max_len=CTX_LEN - 1)
    assert result.equivalent, str(result)


@pytest.mark.parametrize("preset", ["ort", "qaic"])
@pytest.mark.parametrize("name", ["gemma", "gemma2", "bloom"])
def test_optimum_exports_that_read_the_past_length_through_the_presets(tmp_path: Path, name: str, preset: str) -> None:
    """``qgraph optimize --preset ort|qaic --verify``: cleanup first (BLOOM's layer 1 then has no inferred dims,
    which the attention pass must trace through the projection to fuse it), every pass verified by replay."""
    out = tmp_path / "model.onnx"
    assert main(["optimize", str(OPTIMUM / name / "model.onnx"), "-o", str(out), "--preset", preset, "--verify"]) == 0

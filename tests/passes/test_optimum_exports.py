"""The presets on graphs optimum made (tests/data/optimum-onnx-0.1): not qgraph's exports, another transformers.

optimum's graphs already carry a concat KV cache and transformers 4.57's
spellings traced by the TorchScript exporter. ``qgraph optimize --preset
ort --verify`` must exit 0 on each, lower every layer the zoo's own exports
of the architecture lower, and the result must replay the optimum graph
itself (its cache against the lowered graph's). Each case met a failure
first: GPT-2's and Falcon's scale is computed at run time from the query's
head size (the attention pass took it for no scale at all and fused
nothing); GPT-J's Q/K/V, once packed, were packed again with its parallel
MLP's fc_in further down, which left the graph out of topological order;
and GPT-J's cos/sin, gathered from its position table by
``position_ids.repeat(1, 1, width)``, had a width the probes could not read
(``Expand``, ``Tile`` and ``GatherElements`` now pass static dims on).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qgraph import io
from qgraph.cli import main
from qgraph.verify.sequence import check_sequence_equivalence

OPTIMUM = Path(__file__).resolve().parent.parent / "data" / "optimum-onnx-0.1"
LAYERS = 2
ARCHS = ["falcon", "gpt2", "gpt_neox", "gptj", "llama", "phi", "qwen3"]


def _count(model, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_the_ort_preset_verifies_and_replays_optimums_graph(tmp_path, capsys, arch) -> None:
    source = OPTIMUM / arch / "model.onnx"
    out = tmp_path / "model.onnx"
    assert main(["optimize", str(source), "-o", str(out), "--preset", "ort", "--verify"]) == 0
    table = capsys.readouterr().out
    assert "cached replay gives the logits of the input's own cache" in table
    model = io.load(out)
    assert _count(model, "GroupQueryAttention") == LAYERS and _count(model, "Attention") == 0
    assert "near miss in lower-gqa" not in table and "near miss in attention-io" not in table, table
    replay = check_sequence_equivalence(out, source, examples=6, seed=4, max_len=10)
    assert replay.equivalent, str(replay)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "gptj", "qwen3"])
def test_the_qaic_preset_verifies_on_optimums_graph(tmp_path, arch) -> None:
    """The device's retained cache built from optimum's concat cache, for the spellings that failed first (and
    Qwen3's per-head q/k norms, whose head size TorchScript leaves symbolic: lowered to CustomRMSNorm too, the
    one op the opset-17 downgrade has no older version of)."""
    out = tmp_path / "model.onnx"
    assert main(["optimize", str(OPTIMUM / arch / "model.onnx"), "-o", str(out), "--preset", "qaic", "--verify"]) == 0
    model = io.load(out)
    # QEfficient's contract: retained past_key.N / past_value.N, attention lowered to primitives for the device
    assert [v.name for v in model.graph.outputs][1:] == [f"past_{kind}.{i}_RetainedState" for i in range(LAYERS)
                                                         for kind in ("key", "value")]
    assert _count(model, "Attention") == 0

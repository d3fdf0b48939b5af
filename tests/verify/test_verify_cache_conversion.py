"""``--verify`` of kv-cache on a graph that already has optimum's concat cache, as a user runs it.

The input is the tiny Llama with a concat cache (``past_key_values.*`` ->
``present.*``, made by ``kv-cache style=concat``); ``kv-cache`` converts it to
the retained form. ``--verify`` used to stop with exit 2 ("should be the
no-cache graph"); it now replays both cached graphs on the same tokens.
A conversion broken on purpose (queries see one slot fewer) must fail it.
"""

from __future__ import annotations

import contextlib
import io
import json

import onnx_ir as ir
import pytest

from qgraph import io as qio
from qgraph.cli import main
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline


@pytest.fixture(scope="module")
def concat_llama(tiny_zoo, tmp_path_factory):
    source = tiny_zoo.export("llama", "dynamo").model_path
    model = qio.load(source)
    PassManager(Pipeline([{"pass": "kv-cache", "options": {"style": "concat"}}])).run(model)
    assert any(v.name == "past_key_values.0.key" for v in model.graph.inputs)
    path = tmp_path_factory.mktemp("concat") / "model.onnx"
    qio.save(model, path)
    return path


def _optimize_verified(source, tmp_path) -> tuple[int, str, dict]:
    out, report = tmp_path / "retained.onnx", tmp_path / "report.json"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["optimize", str(source), "-o", str(out), "--passes", "kv-cache", "--option",
                     "kv-cache.ctx_len=12", "--verify", "--report", str(report)], out=io.StringIO())
    data = json.loads(report.read_text()) if report.exists() else {}
    return code, err.getvalue(), data


def test_verify_replays_the_concat_input_against_the_retained_output(concat_llama, tmp_path):
    code, err, report = _optimize_verified(concat_llama, tmp_path)
    assert code == 0, err
    record = next(p for p in report["passes"] if p["name"] == "kv-cache")
    assert "input's own cache" in record["verification"]
    converted = ir.load(tmp_path / "retained.onnx")
    assert {"past_key.0", "position_ids"} <= {v.name for v in converted.graph.inputs}


def test_verify_fails_a_conversion_broken_on_purpose(concat_llama, tmp_path, monkeypatch):
    from qgraph_passes.kv_cache import retained

    def strict(self, layer):
        """Slot c visible iff c < p: each query loses its own key (an off-by-one conversion)."""
        b = self.b
        query = b.op("Unsqueeze", b.op("Max", self.positions, b.const(0)), b.const([1, 3]))
        slots = b.op("Unsqueeze", self.slot_range(), b.const([0, 1, 2]))
        visible = b.op("Less", slots, query)
        visible.shape = ir.Shape([self.positions.shape[0], 1, self.positions.shape[1], self.length_dim])
        return visible

    monkeypatch.setattr(retained._Shared, "visibility", strict)
    code, err, _ = _optimize_verified(concat_llama, tmp_path)
    assert code == 1, err
    assert "kv-cache" in err and "NOT SEQUENCE-EQUIVALENT" in err
    assert not (tmp_path / "retained.onnx").exists()

"""The framework and the cleanup preset on graphs the real torch exporters emit.

Hand-built graphs only show that a pass does what its author imagined; these
tests run the cleanup pipeline (with --verify's per-step check) on a tiny
random-weight Llama exported by both torch exporters, and check the result
is equivalent to the export and passes the invariants.
"""

from __future__ import annotations

import pytest

import qgraph
from qgraph import io
from qgraph.invariants import find_violations
from qgraph.verify import check_equivalent


@pytest.fixture(scope="session")
def tiny_llama_exports(tiny_zoo):
    """The zoo's tiny random-weight Llama (GQA), one export per exporter."""
    return {exporter: tiny_zoo.export("llama", exporter).model_path for exporter in ("torchscript", "dynamo")}


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_cleanup_preset_keeps_meaning_on_real_exports(tiny_llama_exports, tmp_path, exporter):
    source = tiny_llama_exports[exporter]
    output = tmp_path / "clean.onnx"
    result, report = qgraph.optimize_with_report(source, preset="cleanup", output=output, verify=True, verify_examples=3)
    assert result == output.resolve()
    cleaned = io.load(output)
    assert find_violations(cleaned) == []
    assert report.nodes_after <= report.nodes_before
    if exporter == "torchscript":
        # The TorchScript exporter's duplicated shape arithmetic is what CSE
        # and folding exist for: the graph must shrink substantially.
        assert report.nodes_after < 0.7 * report.nodes_before
    verdict = check_equivalent(io.load(source), cleaned, examples=5)
    assert verdict.equivalent, str(verdict)


@pytest.mark.slow
def test_opset_upgrade_on_the_torchscript_export(tiny_llama_exports, tmp_path):
    """opset 17 -> 23 (what the canonical ops need) on a real export."""
    source = tiny_llama_exports["torchscript"]
    model = io.load(source)
    qgraph.PassManager(["opset-upgrade"]).run(model)
    assert model.opset_imports[""] == 23
    verdict = check_equivalent(io.load(source), model, examples=5)
    assert verdict.equivalent, str(verdict)

"""rmsnorm and lower-rmsnorm on the tiny zoo, as both torch exporters write it.

Expected counts come from the architectures, not from the pass: every
decoder layer has two RMSNorms (Gemma2 four), the model one final norm, and
Qwen3 also normalizes q and k in every layer. LayerNorm models have none.
"""

from __future__ import annotations

import pytest

import qgraph
from qgraph import io
from qgraph.export.zoo import LAYERS
from qgraph.verify import check_equivalent

NORMS_PER_LAYER = {"llama": 2, "qwen2": 2, "phi3": 2, "mistral": 2, "gemma": 2, "gemma2": 4, "qwen3": 2 + 2}
NO_RMSNORM = ("gpt2", "bert")  # LayerNorm: a decoder and an encoder
EXPORTERS = ("torchscript", "dynamo")


def expected_norms(arch: str) -> int:
    return NORMS_PER_LAYER[arch] * LAYERS + 1 if arch in NORMS_PER_LAYER else 0


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", [*NORMS_PER_LAYER, *NO_RMSNORM])
def test_every_rms_norm_of_the_zoo_fuses_and_the_outputs_stay(tiny_zoo, arch, exporter):
    source = tiny_zoo.export(arch, exporter).model_path
    fused, report = qgraph.optimize_with_report(io.load(source), ["rmsnorm"])
    record = report.passes[-1]
    assert record.name == "rmsnorm"
    assert record.op_histogram.get("RMSNormalization", 0) == expected_norms(arch)
    assert record.notes == []  # nothing RMSNorm-like left behind
    if arch in NORMS_PER_LAYER:
        assert "ReduceMean" not in record.op_histogram
        verdict = check_equivalent(io.load(source), fused, examples=3, localize_divergence=False, save_artifacts=False)
        assert verdict.equivalent, str(verdict)


@pytest.mark.slow
@pytest.mark.parametrize("to, op", [("custom-rmsnorm", "com.qti.aisw.onnx::CustomRMSNorm"),
                                    ("simplified-layer-norm", "com.microsoft::SimplifiedLayerNormalization"),
                                    ("primitive", "ReduceMean")])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_lowered_forms_of_the_zoo_qwen3_stay_equivalent(tiny_zoo, exporter, to, op):
    """Qwen3 has both kinds (hidden-state norms and per-head q/k norms).

    The dynamo export is then taken down to opset 17 as the qaic preset does
    (the lowered ops must survive it); the TorchScript export keeps a
    ConstantOfShape onnx's converter cannot take below 19, so it stays at 23.
    """
    source = tiny_zoo.export("qwen3", exporter).model_path
    target = 17 if exporter == "dynamo" else 23
    pipeline = ["rmsnorm", "lower-rmsnorm", "opset-upgrade"]
    options = {"lower-rmsnorm": {"to": to}, "opset-upgrade": {"target": target}}
    lowered, report = qgraph.optimize_with_report(io.load(source), pipeline, options=options)
    lowering = next(p for p in report.passes if p.name == "lower-rmsnorm")
    assert lowering.notes == []
    assert lowering.op_histogram.get(op, 0) == expected_norms("qwen3")
    assert "RMSNormalization" not in report.passes[-1].op_histogram
    assert lowered.opset_imports[""] == target
    verdict = check_equivalent(io.load(source), lowered, examples=3, localize_divergence=False, save_artifacts=False)
    assert verdict.equivalent, str(verdict)

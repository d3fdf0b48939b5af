"""attention on real exports: every zoo model, both exporters, one Attention per layer, same outputs."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from qgraph_passes.attention import AttentionFusionPass
from qgraph_passes.opset_upgrade import OpsetUpgradePass

import qgraph
from qgraph.export.zoo import LAYERS, TINY_ARCHS
from qgraph.verify import check_equivalent

CASES = [(arch, exporter) for arch in TINY_ARCHS for exporter in ("dynamo", "torchscript")]


@pytest.mark.parametrize(("arch", "exporter"), CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_one_attention_per_layer_and_equivalent_outputs(tiny_zoo, arch, exporter, tmp_path):
    source = tiny_zoo.export(arch, exporter).model_path
    fused, report = qgraph.optimize_with_report(ir.load(source), ["attention"])
    record = report.passes[-1]
    attention = [n for n in fused.graph if n.op_type == "Attention"]
    assert len(attention) == LAYERS, record.notes
    assert sorted(n.metadata_props.get("qgraph.layer") for n in attention) == [str(i) for i in range(LAYERS)]
    assert not any(note.startswith("not fused") for note in record.notes), record.notes
    # Padded batches included (left and right padding, drawn by the verifier).
    result = check_equivalent(str(source), fused, examples=4, artifacts_dir=tmp_path)
    assert result.equivalent, result.report or result.error


def test_a_core_that_does_not_fuse_is_reported_with_its_layer_and_check(tiny_zoo):
    model = ir.load(tiny_zoo.export("llama", "torchscript").model_path)
    OpsetUpgradePass(target=23)(model)
    softmax = [n for n in model.graph if n.op_type == "Softmax" and "layers.1/" in n.name]
    assert len(softmax) == 1
    softmax[0].attributes["axis"] = ir.AttrInt64("axis", 2)  # no longer softmax over the keys
    fusion = AttentionFusionPass()
    fusion(model)
    fused = [n for n in model.graph if n.op_type == "Attention"]
    assert [n.metadata_props["qgraph.layer"] for n in fused] == ["0"]
    notes = [n for n in fusion.report.notes if n.startswith("not fused")]
    assert len(notes) == 1 and "layer 1" in notes[0] and "axis" in notes[0], notes

"""attention on the zoo's BLOOM (ALiBi, batched heads), and plain exports of GPT-BigCode and GPT-Neo."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from qgraph_passes.attention import AttentionFusionPass
from qgraph_passes.opset_upgrade import OpsetUpgradePass

import qgraph
from qgraph.export.zoo import LAYERS
from qgraph.verify import check_equivalent

EXPORTERS = ("dynamo", "torchscript")
PLAIN = [(arch, exporter) for arch in ("bloom", "gpt_bigcode", "gpt_neo") for exporter in EXPORTERS]


def _fused(source):
    fused, report = qgraph.optimize_with_report(ir.load(source), ["attention"])
    record = report.passes[-1]
    attention = [n for n in fused.graph if n.op_type == "Attention"]
    assert len(attention) == LAYERS, record.notes
    assert sorted(n.metadata_props.get("qgraph.layer") for n in attention) == [str(i) for i in range(LAYERS)]
    assert not any(note.startswith("not fused") for note in record.notes), record.notes
    return fused, attention


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_bloom_fuses_every_layer_with_its_alibi_in_the_mask(tiny_zoo, exporter, tmp_path):
    source = tiny_zoo.export("bloom", exporter).model_path
    fused, attention = _fused(source)
    for node in attention:
        assert node.metadata_props.get("qgraph.mask_bias") == "position"
        q, k, v, mask = node.inputs
        assert all(len(x.shape) == 4 for x in (q, k, v)), "Q/K/V must be 4-D BHSD"
        assert mask.dtype == ir.DataType.FLOAT and len(mask.shape) == 4
    assert "Softmax" not in [n.op_type for n in fused.graph]
    # Padded batches included (left and right padding, drawn by the verifier).
    result = check_equivalent(str(source), fused, examples=4, artifacts_dir=tmp_path)
    assert result.equivalent, result.report or result.error


@pytest.mark.parametrize(("arch", "exporter"), PLAIN, ids=[f"{a}-{e}" for a, e in PLAIN])
def test_plain_exports_fuse_one_attention_per_layer(tiny_zoo, arch, exporter, tmp_path):
    source = tiny_zoo.export(arch, exporter, wrapper="plain").model_path
    fused, attention = _fused(source)
    assert all(n.metadata_props.get("qgraph.mask_bias") == ("position" if arch == "bloom" else None)
               for n in attention)
    result = check_equivalent(str(source), fused, examples=4, artifacts_dir=tmp_path)
    assert result.equivalent, result.report or result.error


def test_a_bloom_core_that_does_not_fuse_says_why(tiny_zoo):
    """Break layer 1's scores view (heads before batch): layer 0 fuses, layer 1 is reported with the check."""
    model = ir.load(tiny_zoo.export("bloom", "dynamo").model_path)
    OpsetUpgradePass(target=23)(model)
    ir.passes.common.ShapeInferencePass(data_prop=True)(model)
    softmax = [n for n in model.graph if n.op_type == "Softmax" and "h.1" in n.metadata_props.get(
        "pkg.torch.onnx.name_scopes", "") + (n.name or "")]
    assert len(softmax) == 1
    view = softmax[0].inputs[0].producer().inputs[0].producer()
    assert view.op_type == "Reshape"
    target = view.inputs[1].producer()
    assert target.op_type == "Concat" and len(target.inputs) == 4
    swapped = list(target.inputs)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # [H, B, S, T]: heads mixed with batch, in layer 1 only
    concat = ir.node("Concat", swapped, attributes={"axis": 0}, name="swapped_view_target")
    model.graph.insert_before(view, concat)
    view.replace_input_with(1, concat.outputs[0])
    fusion = AttentionFusionPass()
    fusion(model)
    fused = [n for n in model.graph if n.op_type == "Attention"]
    assert [n.metadata_props["qgraph.layer"] for n in fused] == ["0"]
    notes = [n for n in fusion.report.notes if n.startswith("not fused")]
    assert len(notes) == 1 and "layer 1" in notes[0] and "does not split the scores' first axis" in notes[0], notes

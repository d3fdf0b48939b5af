"""The framework and the cleanup preset on graphs the real torch exporters emit.

Hand-built graphs only show that a pass does what its author imagined; these
tests run the cleanup pipeline (with --verify's per-step check) on a tiny
random-weight Llama exported by both torch exporters, and check the result
is equivalent to the export and passes the invariants.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import qgraph
from qgraph import io
from qgraph.invariants import find_violations
from qgraph.verify import check_equivalent


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.fixture(scope="session")
def tiny_llama_exports(tmp_path_factory):
    """One export per exporter, made once per test session."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    wrapped = _LogitsOnly(transformers.LlamaForCausalLM(config).eval())
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    folder = tmp_path_factory.mktemp("exports")
    paths = {}
    paths["torchscript"] = folder / "llama_ts.onnx"
    torch.onnx.export(
        wrapped, (ids, mask), str(paths["torchscript"]), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
    )
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        wrapped, (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    paths["dynamo"] = folder / "llama_dynamo.onnx"
    program.save(str(paths["dynamo"]))
    return paths


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

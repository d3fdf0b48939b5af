"""The ort preset on a user's plain export: every layer lowered to GroupQueryAttention, as on qgraph's own.

A plain ``torch.onnx.export(model, (input_ids, attention_mask))`` (the zoo's
``wrapper="plain"``) counts positions itself, so its rotary tables have a
batch of one and the rotary pass broadcasts them with Shape reads of the
head-split Transpose; TorchScript computes its head split's target at run
time. Before shape-reads, attention-io refused those layers and lower-gqa
took none. The expected count is the architecture's layer count, and it is
also what the same preset gives on qgraph's own export of the model: the
plain export must lose nothing. ``qgraph optimize --preset ort --verify``
exits 0, and the result replays the plain export's logits.

Phi's partial rotary and GPT-J's interleaved one go into the kernel
(16 of 32 channels turned), the same on both exports. Falcon and GPT-BigCode (multi-query) and GPT-NeoX
cut q, k and v out of one fused projection in their own ways; attention-io
reads them as heads of its columns, on the plain export as on qgraph's own.
Bloom's ALiBi biases go into the kernel inside its mask (``attention_bias``);
with ``mask=none``, which has no bias input, its layers are refused for what
the architecture is, the same on both exports, and the near-miss line says so.
"""

from __future__ import annotations

import collections

import pytest

from qgraph import io
from qgraph.cli import main
from qgraph.export.zoo import LAYERS
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.registry import default_registry
from qgraph.verify.sequence import check_sequence_equivalence

# gemma2: soft-capped scores (GroupQueryAttention's softcap) and alternating sliding windows; falcon, gpt_bigcode,
# gpt_neox: heads cut out of a fused QKV projection (multi-query; per-head q, k, v with a partial rotary); bloom:
# per-head q, k, v and ALiBi in its mask; gpt2, opt, gpt_neo: learned positions, TorchScript's head splits of
# run-time shapes (gpt_neo: a local layer, and dynamo's Min(128, S) merge); phi3: packed qkv_proj sliced apart
ARCHS = ("llama", "mistral", "qwen2", "gemma2", "falcon", "gpt_bigcode", "gpt_neox", "bloom", "gpt2", "opt", "gpt_neo",
         "phi3")
CASES = [(arch, exporter) for arch in ARCHS for exporter in ("dynamo", "torchscript")]


def _gqa_count(model) -> int:
    return collections.Counter((n.domain, n.op_type) for n in model.graph)[("com.microsoft", "GroupQueryAttention")]


def _own_export_count(tiny_zoo, arch: str, exporter: str) -> int:
    registry = default_registry()
    model = io.load(tiny_zoo.export(arch, exporter).model_path)
    PassManager(Pipeline.from_preset("ort", registry), registry=registry).run(model)
    return _gqa_count(model)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), CASES)
def test_every_layer_of_a_plain_export_is_lowered_and_replays(tiny_zoo, tmp_path, capsys, arch, exporter):
    plain = tiny_zoo.export(arch, exporter, wrapper="plain")
    out = tmp_path / "model.onnx"
    assert main(["optimize", str(plain.model_path), "-o", str(out), "--preset", "ort", "--verify"]) == 0
    table = capsys.readouterr().out
    lowered = _gqa_count(io.load(out))
    assert lowered == LAYERS == _own_export_count(tiny_zoo, arch, exporter)
    assert "near miss in lower-gqa" not in table and "near miss in attention-io" not in table, table
    replay = check_sequence_equivalence(out, plain.model_path, examples=8, seed=3, max_len=12)
    assert replay.equivalent, str(replay)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), [("phi", "dynamo"), ("gptj", "dynamo"), ("gptj", "torchscript")])
def test_a_partial_rotary_goes_into_the_kernel_on_both_exports(tiny_zoo, tmp_path, capsys, arch, exporter):
    """Phi rotates 16 of each head's 32 channels, GPT-J the same in interleaved pairs: the kernel turns them itself
    (do_rotary, a cos/sin cache 8 wide), on the plain export as on qgraph's own, and the result replays the plain
    export (GPT-J's plain export reads its sin/cos from a table by positions it counts itself)."""
    plain = tiny_zoo.export(arch, exporter, wrapper="plain")
    out = tmp_path / "model.onnx"
    assert main(["optimize", str(plain.model_path), "-o", str(out), "--preset", "ort", "--verify"]) == 0
    model = io.load(out)
    assert _gqa_count(model) == LAYERS == _own_export_count(tiny_zoo, arch, exporter)
    assert not [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.attributes["do_rotary"].value == 1 and n.inputs[7].shape[1] == 8 for n in gqa)
    assert all(("rotary_interleaved" in n.attributes) == (arch == "gptj") for n in gqa)
    replay = check_sequence_equivalence(out, plain.model_path, examples=8, seed=3, max_len=12)
    assert replay.equivalent, str(replay)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_layer_refused_on_both_exports_is_reported_as_what_it_is(tiny_zoo, tmp_path, capsys, exporter):
    """Bloom adds ALiBi position biases to its scores, which lower-gqa's mask=none has no input for: it lowers
    none of its layers, and the near-miss line says why (its fused, per-head QKV projection no longer stops it
    earlier: attention-io packs its heads)."""
    plain = tiny_zoo.export("bloom", exporter, wrapper="plain")
    out = tmp_path / "model.onnx"
    assert main(["optimize", str(plain.model_path), "-o", str(out), "--preset", "ort",
                 "--option", "lower-gqa.mask=none"]) == 0
    table = capsys.readouterr().out
    assert _gqa_count(io.load(out)) == 0
    line = next(line for line in table.splitlines() if line.startswith("near miss in lower-gqa"))
    assert f"{LAYERS} candidate(s) rejected" in line and "key-position bias (ALiBi)" in line, line

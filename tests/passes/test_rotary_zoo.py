"""rotary on the tiny zoo, both exporters: every rotation the architecture has is fused, and the outputs stay.

Expected counts come from the architectures, not from the pass: a rotary
decoder rotates q and k in every layer (SmolLM3 only in layer 0, its NoPE
layer 1 has no positions); Phi and GPT-J turn only part of each head, GPT-J
in interleaved pairs. Learned positions and ALiBi have nothing to fuse.
This is the coverage the "ort fusions across the zoo" table reports
(benchmarks/ort_fusions_zoo.py): it fails if any cell of it regresses.
"""

from __future__ import annotations

import pytest

import qgraph
from qgraph import io
from qgraph.export.zoo import LAYERS
from qgraph.verify import check_equivalent

ROTARY_LAYERS = {"llama": LAYERS, "qwen2": LAYERS, "phi3": LAYERS, "gemma": LAYERS, "mistral": LAYERS,
                 "qwen3": LAYERS, "gemma2": LAYERS, "phi": LAYERS, "gptj": LAYERS, "smollm3": 1,
                 "gpt_neox": LAYERS, "stablelm": LAYERS, "granite": LAYERS, "olmo2": LAYERS, "starcoder2": LAYERS,
                 "falcon": LAYERS, "llama3_rope": LAYERS}
# rotary_dim 8 of 16 (Phi, GPT-J: partial_rotary_factor 0.5), 4 of 16 (GPT-NeoX, StableLM: 0.25)
PARTIAL = {"phi", "gptj", "gpt_neox", "stablelm"}
INTERLEAVED = {"gptj"}  # rotate_every_two
NO_ROTARY = ("gpt2", "opt", "bloom", "gpt_bigcode", "gpt_neo")  # learned positions, ALiBi
EXPORTERS = ("torchscript", "dynamo")


def test_the_table_covers_every_decoder_of_the_zoo():
    from qgraph.export.zoo import TINY_ARCHS

    decoders = {name for name, arch in TINY_ARCHS.items() if arch.task == "causal-lm"}
    assert decoders == set(ROTARY_LAYERS) | set(NO_ROTARY)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", [*ROTARY_LAYERS, *NO_ROTARY])
def test_every_rotary_of_the_zoo_fuses_and_the_outputs_stay(tiny_zoo, arch, exporter):
    source = tiny_zoo.export(arch, exporter).model_path
    fused, report = qgraph.optimize_with_report(io.load(source), ["rotary"])
    record = report.passes[-1]
    assert record.name == "rotary"
    assert record.notes == []  # no rotary-like candidate refused
    nodes = [n for n in fused.graph if n.op_type == "RotaryEmbedding"]
    assert len(nodes) == 2 * ROTARY_LAYERS.get(arch, 0)  # q and k
    if not nodes:
        return
    assert "Neg" not in [n.op_type for n in fused.graph]  # no spelled-out rotation left
    for node in nodes:
        interleaved = node.attributes.get("interleaved")
        assert bool(interleaved is not None and interleaved.value) == (arch in INTERLEAVED)
        dim = node.attributes.get("rotary_embedding_dim")
        assert bool(dim is not None and dim.value) == (arch in PARTIAL)
    verdict = check_equivalent(io.load(source), fused, examples=3, localize_divergence=False, save_artifacts=False)
    assert verdict.equivalent, str(verdict)

"""The ort preset's fusions on zoo exports: counts that follow from the architecture, and sequence replay.

Expected counts come from the architectures, not from the passes: every
layer rotates q and k (Phi: only the first half of each head; GPT-J: the
first half, in interleaved pairs), projects Q/K/V from one input (and
gate/up in a gated MLP; Phi3's are packed already), and a pre-norm decoder
normalizes each residual sum. The whole zoo, both exporters, is
benchmarks/ort_fusions_zoo.py (RESULTS.md, "ort fusions across the zoo").
"""

from __future__ import annotations

import collections

import pytest

from qgraph import io as qio
from qgraph.export.zoo import LAYERS
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.registry import default_registry
from qgraph.verify.sequence import check_sequence_equivalence

# arch: (rotations, partial ones, interleaved ones, packs of three, packs of two, skip norms) per layer.
# Phi and GPT-J run attention and MLP in parallel on one norm, so q, k, v and fc1 are four siblings: a
# pack of three, then of two.
EXPECTED = {"llama": (2, 0, 0, 1, 1, 2), "phi": (2, 2, 0, 1, 1, 0), "phi3": (2, 0, 0, 0, 0, 2),
            "gptj": (2, 2, 2, 1, 1, 0), "starcoder2": (2, 0, 0, 1, 0, 0),
            # one fused QKV projection each; Falcon's parallel MLP reads the same norm (a pack of two),
            # GPT-NeoX rotates a quarter of each head, GPT-BigCode has learned positions
            "falcon": (2, 0, 0, 0, 1, 0), "gpt_bigcode": (0, 0, 0, 0, 0, 0), "gpt_neox": (2, 2, 0, 0, 1, 0)}
# GPT-NeoX's parallel MLP has a norm of its own, with the same initial weights as the attention's in the tiny
# zoo: the dynamo exporter stores equal weights once, so cse merges the two norms and the QKV and MLP
# projections become siblings; the TorchScript export keeps two weights, two norms, nothing to pack.
PACKS_OF_TWO = {("gpt_neox", "torchscript"): 0}
# attention-io's head packing per layer. Phi and Phi3 merge their heads back through a Reshape whose target
# is computed at run time; shape-reads makes it a constant, and the dynamo exports pack. The TorchScript
# exports of Phi and StarCoder2 view the attention output as [B, -1, S, D] before moving the heads back:
# shape-reads removes that view (D proven to be v's head size), and the heads pack. Phi3's keeps a
# Reshape the rule does not know (a near miss in the report: "is Reshape, not Attention"), and GPT-J
# rotates [B, S, H, D] before moving the heads, so their Attention keeps BHSD inputs.
PACKED_HEADS = {"llama": 1, "phi": 1, "phi3": 1, "gptj": 0, "starcoder2": 1, "falcon": 1, "gpt_bigcode": 1,
                "gpt_neox": 1}
# Falcon and GPT-BigCode (multi-query: one K/V head) and GPT-NeoX (q, k, v side by side per head) cut their heads
# out of the fused projection in their own ways; attention-io reads them as heads of its columns (GPT-NeoX's
# reordered in the weights) and every layer is lowered to GroupQueryAttention.
PROJECTION_HEADS = {"falcon", "gpt_bigcode", "gpt_neox"}
NOT_PACKED = {("phi3", "torchscript")}
# GPT-J rotates q and k as [B, S, H, D] and then moves the heads in front: the rotary pass's transpose back
# merges with that one, per layer for q and for k.
HEADS_BACK = {"gptj": 2}
# The TorchScript export of the decoders whose rotary needed more than the dynamo spelling (Phi's and
# Phi3's head size is symbolic in its stored shapes; GPT-J is interleaved) must fuse the same rotations.
CASES = [*((arch, "dynamo") for arch in EXPECTED), ("llama", "torchscript"), ("phi", "torchscript"),
         ("phi3", "torchscript"), ("gptj", "torchscript"), ("starcoder2", "torchscript"),
         *((arch, "torchscript") for arch in sorted(PROJECTION_HEADS))]


@pytest.mark.slow
@pytest.mark.parametrize("arch, exporter", CASES)
def test_the_ort_preset_fuses_what_the_architecture_has_and_replays(tiny_zoo, tmp_path, arch, exporter):
    exported = tiny_zoo.export(arch, exporter)
    model = qio.load(exported.model_path)
    registry = default_registry()
    report = PassManager(Pipeline.from_preset("ort", registry), registry=registry).run(model)
    matches = collections.Counter()
    for record in report.passes:
        matches.update(record.rule_matches)
    rotations, partial, interleaved, qkv, gate_up, skip = EXPECTED[arch]
    assert matches["rotary-half"] + matches["rotary-interleaved"] == rotations * LAYERS
    assert matches["rotary-interleaved"] == interleaved * LAYERS
    assert matches["rotary-partial"] + matches["rotary-partial-heads-second"] == partial * LAYERS
    assert matches["rotary-heads-back"] == HEADS_BACK.get(arch, 0) * LAYERS
    gate_up = PACKS_OF_TWO.get((arch, exporter), gate_up)
    assert matches["pack-three-matmuls"] == qkv * LAYERS and matches["pack-two-matmuls"] == gate_up * LAYERS
    packed = 0 if (arch, exporter) in NOT_PACKED else PACKED_HEADS[arch]
    assert matches["attention-packed-heads"] == packed * LAYERS
    assert matches["attention-cache-inputs"] == LAYERS
    # TorchScript's second sum of a layer has addends of unrelated dim names after kv-cache; their dims'
    # proven sources are the same (skip-rmsnorm reads them), so both exporters fuse every sum
    assert matches["skip-rmsnorm"] == skip * LAYERS
    assert matches["projection-heads"] == (LAYERS if arch in PROJECTION_HEADS else 0)
    ops = collections.Counter(n.op_type for n in model.graph)
    if arch in PROJECTION_HEADS:
        assert ops["GroupQueryAttention"] == LAYERS and ops["Attention"] == 0
    # no head transpose left where the heads packed (StarCoder2's tied LM head keeps its 2-D weight Transpose)
    head_transposes = sum(1 for n in model.graph if n.op_type == "Transpose" and len(n.attributes["perm"].value) == 4)
    assert ops["Neg"] == 0 and (head_transposes == 0 or not packed)
    out = tmp_path / "model.onnx"
    qio.save(model, out)
    replay = check_sequence_equivalence(out, exported.model_path, examples=6, require_greedy=True)
    assert replay.equivalent, str(replay)

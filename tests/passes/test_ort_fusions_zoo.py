"""The ort preset's fusions on zoo exports: counts that follow from the architecture, and sequence replay.

Expected counts come from the architectures, not from the passes: every
layer of a rotary model rotates q and k (Phi: only the first half of each
head; GPT-J: the first half, in interleaved pairs; GPT-2, OPT and GPT-Neo
learn positions instead), projects Q/K/V from one input (and gate/up in a
gated MLP; Phi3's and GPT-2's are packed already), and a pre-norm RMSNorm
decoder normalizes each residual sum; every layer whose heads pack is one
GroupQueryAttention. The whole zoo, both exporters, is
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
# GPT-2, OPT and GPT-Neo have learned positions (no rotation) and LayerNorm (no RMSNorm to fuse); GPT-2's
# Conv1D already projects Q/K/V as one Gemm.
EXPECTED = {"llama": (2, 0, 0, 1, 1, 2), "phi": (2, 2, 0, 1, 1, 0), "phi3": (2, 0, 0, 0, 0, 2),
            "gptj": (2, 2, 2, 1, 1, 0), "starcoder2": (2, 0, 0, 1, 0, 0), "gpt2": (0, 0, 0, 0, 0, 0),
            "opt": (0, 0, 0, 1, 0, 0), "gpt_neo": (0, 0, 0, 1, 0, 0),
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
# shape-reads removes that view (D proven to be v's head size), and the heads pack. Phi3's TorchScript
# rotates a slice of each head as wide as its cos table and concatenates the rest: shape-reads proves the
# slice whole and the rest empty, and the heads pack. GPT-2's, OPT's and GPT-Neo's TorchScript head splits
# are [B, S, -1, D] of a run-time B and S (dim_sources proves them); GPT-Neo's dynamo export merges one
# layer's heads into [B, Min(128, S), H*D], a Reshape kept after the packed output. GPT-J rotates
# [B, S, H, D] before moving the heads; once the rotary pass has cancelled the transposes, its partial,
# interleaved rotations read heads(x3) like any other and pack (num_heads).
PACKED_HEADS = {"llama": 1, "phi": 1, "phi3": 1, "gptj": 1, "starcoder2": 1, "gpt2": 1, "opt": 1, "gpt_neo": 1,
                "falcon": 1, "gpt_bigcode": 1, "gpt_neox": 1}
# Falcon and GPT-BigCode (multi-query: one K/V head) and GPT-NeoX (q, k, v side by side per head) cut their heads
# out of the fused projection in their own ways; attention-io reads them as heads of its columns (GPT-NeoX's
# reordered in the weights) and every layer is lowered to GroupQueryAttention.
PROJECTION_HEADS = {"falcon", "gpt_bigcode", "gpt_neox"}
NOT_PACKED: set[tuple[str, str]] = set()
# GPT-J rotates q and k as [B, S, H, D] and then moves the heads in front: the rotary pass's transpose back
# merges with that one, per layer for q and for k.
HEADS_BACK = {"gptj": 2}
# The TorchScript export of the decoders whose rotary needed more than the dynamo spelling (Phi's and
# Phi3's head size is symbolic in its stored shapes; GPT-J is interleaved) must fuse the same rotations.
# GPT-2, OPT and GPT-Neo's TorchScript exports compute every head split's shape at run time.
CASES = [*((arch, "dynamo") for arch in EXPECTED), ("llama", "torchscript"), ("phi", "torchscript"),
         ("phi3", "torchscript"), ("gptj", "torchscript"), ("starcoder2", "torchscript"), ("gpt2", "torchscript"),
         ("opt", "torchscript"), ("gpt_neo", "torchscript"), *((arch, "torchscript") for arch in sorted(PROJECTION_HEADS))]


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
    # every rotation moved onto the packed heads with its attention
    assert matches["rotary-packed-heads"] == packed * rotations * LAYERS
    assert matches["attention-cache-inputs"] == LAYERS
    # TorchScript's second sum of a layer has addends of unrelated dim names after kv-cache; their dims'
    # proven sources are the same (skip-rmsnorm reads them), so both exporters fuse every sum
    assert matches["skip-rmsnorm"] == skip * LAYERS
    assert matches["projection-heads"] == (LAYERS if arch in PROJECTION_HEADS else 0)
    ops = collections.Counter(n.op_type for n in model.graph)
    # no head transpose left where the heads packed (StarCoder2's tied LM head keeps its 2-D weight Transpose)
    head_transposes = sum(1 for n in model.graph if n.op_type == "Transpose" and len(n.attributes["perm"].value) == 4)
    assert ops["Neg"] == 0 and (head_transposes == 0 or not packed)
    # packed heads are what lower-gqa needs: each such layer is one GroupQueryAttention, none left as Attention
    assert (ops["GroupQueryAttention"], ops["Attention"]) == ((LAYERS, 0) if packed else (0, LAYERS))
    out = tmp_path / "model.onnx"
    qio.save(model, out)
    replay = check_sequence_equivalence(out, exported.model_path, examples=6, require_greedy=True)
    assert replay.equivalent, str(replay)

"""Built-in pipelines, written as data in the structure of a TOML pipeline file.

A step is either ``{"pass": NAME}`` (optionally with ``"options": {...}``) or
``{"fixpoint": [NAME, ...], "max_iterations": N}``: the listed passes run in
order, again and again, until a whole round changes nothing or N rounds ran.

A preset is the pipeline for one target (docs/design.md, "canonicalize ->
transform -> lower"): every preset first canonicalizes (RMSNorm and
attention to the ONNX-standard ops), then transforms on the canonical form
(the KV cache), then lowers to what the target's compiler accepts.
"""

from __future__ import annotations

__all__ = ["CLEANUP", "ORT", "ORT_ATTENTION", "ORT_INT4", "ORT_INT4_ATTENTION", "ORT_INT8", "ORT_INT8_ATTENTION", "QAIC"]

# Folding exposes Identity chains and duplicates, merging duplicates leaves
# dead nodes, and removing dead nodes can make more nodes foldable (fewer
# users), so the four run to a fixpoint. Sorting and shape inference are
# needed once, on the cleaned graph; the passes type the values they create,
# so shape inference runs only if some value is still untyped (a TorchScript
# export that no typing pass touched).
_FOLD = {
    "fixpoint": ["constant-folding", "identity-elimination", "cse", "dce"],
    "max_iterations": 8,
}
_FINISH = [_FOLD, {"pass": "topological-sort"}, {"pass": "shape-inference", "options": {"only_missing": True}}]

CLEANUP: dict = {"steps": list(_FINISH)}

# Cleaning first matters for the TorchScript exporter, whose raw graph has
# ~3.5x the dynamo exporter's nodes (shape arithmetic that folds away); the
# fusions then see the same shapes whichever exporter made the graph.
_CANONICALIZE = [_FOLD, {"pass": "rmsnorm"}, {"pass": "attention"}]

# For onnxruntime the canonical form goes further: RotaryEmbedding (opset 23)
# and packed sibling projections (Q/K/V, gate/up). The qaic preset stops at
# _CANONICALIZE: its compiler takes opset <= 17, which has no RotaryEmbedding.
# shape-reads: Reshape targets and Shape reads answered from proven dim sources, so a plain export's
# rotary broadcast (Shape of the head-split Transpose) and TorchScript's run-time head-split targets no
# longer stop attention-io; before kv-cache, whose rewiring leaves some declared shapes stale.
# cse right after: each rotary's slice of the shared cos/sin tables is one node
# again before kv-cache reads the graph (half the kv-cache pass's time).
_CANONICALIZE_ORT = [*_CANONICALIZE, {"pass": "rotary"}, {"pass": "pack-matmuls"}, {"pass": "shape-reads"}, {"pass": "cse"}]

# onnxruntime: canonical ops kept (it runs RMSNormalization, Attention and
# RotaryEmbedding natively), the KV cache in the concat form
# onnxruntime-genai and optimum use, the residual add fused into the next
# norm (com.microsoft::SkipSimplifiedLayerNormalization), fp32.
# logits=last: generation reads one token's logits a row, so the LM head
# (576 x 49152 on SmolLM2, the largest matmul) runs on the chunk's last column
# only instead of on every prompt token (a 14-token SmolLM2 prefill took
# 0.77x (fastest run) to 0.92x (median) of the time, on a shared machine). The
# option's own default for the concat form stays every position, for graphs
# other tools read.
ORT_ATTENTION: dict = {
    "steps": [
        *_CANONICALIZE_ORT,
        {"pass": "kv-cache", "options": {"style": "concat", "logits": "last"}},
        {"pass": "attention-io"},
        {"pass": "skip-rmsnorm"},
        *_FINISH,
    ]
}


def _quantized(preset: dict, bits: int) -> dict:
    """``preset`` with weight-only MatMulNBits: blocks of 32 along K, and accuracy_level 4
    (onnxruntime multiplies with int8 activations, its fast CPU path). 4-bit blocks are
    symmetric (no zero points): on SmolLM2-135M they raise perplexity less than blocks with
    zero points (+26.0 % against +29.7 %) and decode as fast (benchmarks/RESULTS.md, "quantize
    methods"); 8-bit blocks keep zero points (+0.3 % there, "ort vs onnxruntime-genai").
    Quantizing after the KV cache keeps the cache pass on float weights; the
    ``quantize`` options can still be set with ``--option quantize.KEY=VALUE``."""
    quantize = {"pass": "quantize",
                "options": {"bits": bits, "block_size": 32, "symmetric": bits == 4, "accuracy_level": 4}}
    steps = preset["steps"]
    at = len(steps) - len(_FINISH)
    return {"steps": [*steps[:at], quantize, *steps[at:]]}


def _with_gqa(preset: dict) -> dict:
    """``preset`` with each layer's attention lowered to com.microsoft::GroupQueryAttention right after
    ``attention-io`` (before ``quantize``, which then packs the QKV MatMul the GQA node reads). The graph's
    inputs and outputs stay the concat graph's (its mask goes in as attention_bias); ``qgraph generate``
    binds each layer's past and present to one shared buffer. A layer lower-gqa refuses (heads not packed,
    softcap, ...) keeps the standard Attention op, and is reported; a partial or interleaved rotary goes
    into the kernel as well, or stays RotaryEmbedding in front of it where the kernel cannot turn it."""
    steps = list(preset["steps"])
    at = steps.index({"pass": "attention-io"}) + 1
    return {"steps": [*steps[:at], {"pass": "lower-gqa"}, *steps[at:]]}


# ``ort`` lowers attention to GroupQueryAttention: the same contract as the Attention form, no copy of
# the cache per step, rotary inside the kernel (benchmarks/RESULTS.md, "GroupQueryAttention and the
# shared cache buffer" and "ort vs onnxruntime-genai"). The Attention form stays as ``ort-attention``.
ORT: dict = _with_gqa(ORT_ATTENTION)
# lower-mha (com.microsoft::MultiHeadAttention for the layers lower-gqa leaves) is not in ``ort``: measured
# on onnxruntime's CPU it is slower than Attention on short contexts (1.04-1.21x at 16 tokens; faster only
# for long prefills: benchmarks/RESULTS.md, "MultiHeadAttention lowering"); a pipeline that wants it names
# it after lower-gqa.
# The same pipelines at the other precisions (--preset ort-int8 / ort-int4, and their -attention forms);
# ``ort`` itself stays fp32.
ORT_INT8: dict = _quantized(ORT, 8)
ORT_INT4: dict = _quantized(ORT, 4)
ORT_INT8_ATTENTION: dict = _quantized(ORT_ATTENTION, 8)
ORT_INT4_ATTENTION: dict = _quantized(ORT_ATTENTION, 4)

# Cloud AI 100 style: fixed-shape retained-state cache written by the
# device's CtxScatter, CustomRMSNorm, attention back in primitive ops (the
# compiler has no Attention op), constants clipped to the fp16 range, and a
# default-domain opset the compiler accepts (<= 17). The custom ops carry
# function bodies, so the result still runs in onnxruntime.
QAIC: dict = {
    "steps": [
        *_CANONICALIZE,
        {"pass": "kv-cache", "options": {"style": "retained", "scatter": "ctx-scatter"}},
        {"pass": "lower-rmsnorm", "options": {"to": "custom-rmsnorm"}},
        {"pass": "lower-attention", "options": {"to": "primitive"}},
        {"pass": "fp16-clip"},
        {"pass": "opset-upgrade", "options": {"target": 17}},
        *_FINISH,
    ]
}

"""The interface every exported graph has, whatever the model and exporter (no heavy imports).

* inputs ``input_ids`` and ``attention_mask``: int64 [batch, seq], both dims dynamic;
* causal LMs: ``logits`` float32 [batch, seq, vocab] (no KV cache);
* encoders: ``sentence_embedding`` float32 [batch, hidden], pooled with one of :data:`POOLINGS`.

A causal LM is traced through one of :data:`WRAPPERS` (same interface, different positions):
``qgraph`` passes ``position_ids = cumsum(attention_mask) - 1`` (what ``generate`` computes), ``plain``
calls the model with only ``input_ids`` and ``attention_mask``, as a user's plain
``torch.onnx.export(model, (input_ids, attention_mask))`` does, so the model counts positions itself.
"""

from __future__ import annotations

__all__ = ["INPUT_NAMES", "POOLINGS", "WRAPPERS", "output_name"]

INPUT_NAMES = ("input_ids", "attention_mask")
POOLINGS = ("mean", "cls", "max")
#: How a causal LM is wrapped for tracing; the first is the default.
WRAPPERS = ("qgraph", "plain")


def output_name(task: str) -> str:
    """The graph output's name for ``task`` ("causal-lm" or "embedding")."""
    return "logits" if task == "causal-lm" else "sentence_embedding"

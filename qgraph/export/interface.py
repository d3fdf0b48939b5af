"""The interface every exported graph has, whatever the model and exporter (no heavy imports).

* inputs ``input_ids`` and ``attention_mask``: int64 [batch, seq], both dims dynamic;
* causal LMs: ``logits`` float32 [batch, seq, vocab] (no KV cache);
* encoders: ``sentence_embedding`` float32 [batch, hidden], pooled with one of :data:`POOLINGS`.
"""

from __future__ import annotations

__all__ = ["INPUT_NAMES", "POOLINGS", "output_name"]

INPUT_NAMES = ("input_ids", "attention_mask")
POOLINGS = ("mean", "cls", "max")


def output_name(task: str) -> str:
    """The graph output's name for ``task`` ("causal-lm" or "embedding")."""
    return "logits" if task == "causal-lm" else "sentence_embedding"

"""The modules that are traced: a fixed signature around a Hugging Face model.

Every export has the same interface whatever the architecture, so passes and
runtimes downstream can rely on it:

* inputs ``input_ids`` and ``attention_mask``, int64 [batch, seq], both
  dimensions dynamic;
* causal LMs (:class:`CausalLMLogits`, or :class:`PlainCausalLM` for the
  ``plain`` wrapper): output ``logits`` float32 [batch, seq, vocab], computed
  without a KV cache;
* encoders (:class:`SentenceEmbedding`): output ``sentence_embedding``
  float32 [batch, hidden], the last hidden state pooled over the valid
  tokens (``mean`` / ``cls`` / ``max``, the poolings QEfficient's
  QEFFAutoModel offers), optionally L2-normalized as sentence-transformers'
  Normalize module does.

Positions of a causal LM come from the mask (``cumsum(mask) - 1``), as
Hugging Face's ``generate`` computes them, so a left-padded row gets the same
logits at its valid positions as the same row without padding. That is the
meaning a KV-cached graph must reproduce (docs/design.md: position ids, -1 for
padding), and it holds for every architecture, including those whose own
forward would count positions from the first (padding) column.

The ``plain`` wrapper (:class:`PlainCausalLM`) is what a user's own
``torch.onnx.export(model, (input_ids, attention_mask))`` traces: no
``position_ids``, so the model counts positions itself (an arange from the
first column for most, the cumsum of the mask for OPT, none at all for
ALiBi or NoPE layers). Its meaning under left padding is the model's own,
and that is what its export is checked against.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from qgraph.export.interface import INPUT_NAMES, POOLINGS, WRAPPERS, output_name

__all__ = [
    "INPUT_NAMES", "POOLINGS", "WRAPPERS", "CausalLMLogits", "PlainCausalLM", "SentenceEmbedding", "output_name", "pool",
    "wrap",
]


class CausalLMLogits(nn.Module):
    """``(input_ids, attention_mask) -> logits`` of a causal LM, no cache, positions from the mask."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self._takes_positions:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits


class PlainCausalLM(nn.Module):
    """``(input_ids, attention_mask) -> logits`` of a causal LM, no cache, positions as the model counts them.

    Exactly the call a plain ``torch.onnx.export(model, (input_ids, attention_mask))``
    of a Hugging Face causal LM traces (with the cache switched off).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool [batch, seq, hidden] over the tokens whose mask is 1."""
    if pooling == "cls":
        return hidden[:, 0]
    valid = attention_mask.unsqueeze(-1).to(torch.bool)
    if pooling == "mean":
        weights = valid.to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if pooling == "max":
        lowest = torch.finfo(hidden.dtype).min
        return hidden.masked_fill(~valid, lowest).amax(1)
    raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")


class SentenceEmbedding(nn.Module):
    """``(input_ids, attention_mask) -> sentence_embedding`` of an encoder: pooled, maybe L2-normalized."""

    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        self.model = model
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled


def wrap(
    model: nn.Module, task: str, *, wrapper: str = "qgraph", pooling: str = "mean", normalize: bool = False
) -> nn.Module:
    """The module to trace for ``task``, in eval mode.

    ``wrapper`` (causal LMs; encoders ignore it): "qgraph" (:class:`CausalLMLogits`,
    positions from the mask) or "plain" (:class:`PlainCausalLM`, the model's own positions).

    Eval mode is set on the wrapper itself, not only on the model: the
    TorchScript exporter restores the *wrapper's* training flag after
    tracing, and ``train(True)`` on a fresh wrapper would switch dropout
    back on inside the model.
    """
    if wrapper not in WRAPPERS:
        raise ValueError(f"unknown wrapper {wrapper!r}; choose from {', '.join(WRAPPERS)}")
    if task == "causal-lm":
        wrapped: nn.Module = CausalLMLogits(model) if wrapper == "qgraph" else PlainCausalLM(model)
    else:
        wrapped = SentenceEmbedding(model, pooling, normalize)
    return wrapped.eval()

"""Checking a lossy step against a stated budget instead of equality.

A pass that approximates (weight quantization) declares ``meaning =
"approximate"`` and a :class:`Budget`; ``--verify`` then asks whether the
step stayed inside it:

* **decoders** (an ``input_ids`` input and a ``logits`` output; no-cache or
  concat-style KV cache, fed an empty past -- or, when it returns the last
  token's logits only, the text one token a step through its own cache):
  a fixed text is made once from
  the graph *before* the step — a pseudo-random prompt (seeded, ids below
  the vocabulary) continued greedily by that graph to ``text_tokens`` — and
  both graphs read it teacher-forced. The share of continuation positions
  where their greedy next tokens agree must be at least
  ``token_agreement``, and the perplexity of the continuation under the
  step's output may exceed the reference's by at most ``perplexity_rise``
  (relative). The text being the reference's own greedy output makes both
  figures mean what they say on a real model, without a tokenizer.
* **other graphs**: every output on drawn inputs (the strategies of
  :func:`qgraph.verify.check_equivalent`) within ``|q - f| <= e * max(1,
  max|f|) + e * |f|``, ``e = relative_error``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import onnx_ir as ir

from qgraph import io as qio
from qgraph.verify.roles import describe_inputs
from qgraph.verify.runner import OrtRunner

__all__ = ["Budget", "BudgetResult", "check_budget", "fixed_text"]

_CONCAT_PAST = re.compile(r"^past_key_values\.\d+\.(key|value)$")
_PROMPT = 8


@dataclasses.dataclass(frozen=True)
class Budget:
    """How far an approximating step may move the model."""

    token_agreement: float = 0.8
    perplexity_rise: float = 0.05
    relative_error: float = 0.05
    text_tokens: int = 48

    def describe(self) -> str:
        return (f"greedy agreement >= {self.token_agreement:.0%}, perplexity rise <= {self.perplexity_rise:.1%} "
                f"on a {self.text_tokens}-token text (decoders); relative error <= {self.relative_error:g} (others)")


@dataclasses.dataclass
class BudgetResult:
    within: bool
    kind: str  # "decoder" or "outputs"
    budget: Budget
    agreement: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    detail: str = ""

    @property
    def perplexity_rise(self) -> float | None:
        if self.perplexity_before is None or self.perplexity_after is None:
            return None
        return self.perplexity_after / self.perplexity_before - 1.0

    def __bool__(self) -> bool:
        return self.within

    def __str__(self) -> str:
        verdict = "WITHIN BUDGET" if self.within else "OVER BUDGET"
        if self.kind == "decoder":
            return (f"{verdict}: greedy next tokens agree on {self.agreement:.1%} of the text "
                    f"(budget >= {self.budget.token_agreement:.0%}); perplexity {self.perplexity_before:.4g} -> "
                    f"{self.perplexity_after:.4g} ({self.perplexity_rise:+.2%}, budget <= "
                    f"{self.budget.perplexity_rise:+.1%}){self.detail}")
        return f"{verdict}: {self.detail}"


def _is_decoder(model: ir.Model) -> bool:
    inputs = {v.name for v in model.graph.inputs}
    outputs = {v.name for v in model.graph.outputs}
    plain = {"input_ids", "attention_mask", "position_ids"}
    return ("input_ids" in inputs and "logits" in outputs
            and all(name in plain or _CONCAT_PAST.match(name or "") for name in inputs))


def _vocab(model: ir.Model) -> int:
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    if logits.shape is not None and isinstance(logits.shape[-1], int):
        return logits.shape[-1]
    spec = next(s for s in describe_inputs(model) if s.name == "input_ids")
    return int(spec.vocab_size)


def fixed_text(vocab: int, prompt: int = _PROMPT, seed: int = 0) -> np.ndarray:
    """The seeded prompt the text starts from: ids in [3, vocab) (skipping the usual pad/bos/eos)."""
    return np.random.default_rng(seed).integers(min(3, vocab - 1), vocab, size=prompt, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class _Text:
    """One unpadded row of tokens, as :func:`qgraph.verify.cache_steps.step_feeds` reads a case."""

    tokens: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return np.ones(self.tokens.shape, bool)

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.tokens.shape[1], dtype=np.int64)[None]


class _Decoder:
    """Next-token logits of a decoder graph for every position of a token sequence."""

    def __init__(self, model: ir.Model, label: str) -> None:
        self.model = model
        self.runner = OrtRunner(model, label=label)

    def _feeds(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        length = len(tokens)
        feeds: dict[str, np.ndarray] = {}
        for value in self.model.graph.inputs:
            dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.int64)
            if value.name == "input_ids":
                feeds[value.name] = tokens[None, :].astype(dtype)
            elif value.name == "attention_mask":
                feeds[value.name] = np.ones((1, length), dtype)
            elif value.name == "position_ids":
                feeds[value.name] = np.arange(length, dtype=dtype)[None, :]
            else:  # an empty past: batch 1, past length 0, the static dims as declared
                dims = [d if isinstance(d, int) else 0 for d in value.shape]
                dims[0] = 1
                feeds[value.name] = np.zeros(dims, dtype)
        return feeds

    def _logits(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self.runner.run(self._feeds(tokens))["logits"], np.float64)[0]

    def all_positions(self, tokens: np.ndarray) -> np.ndarray:
        """[len(tokens), vocab]: row t scores the token after tokens[: t + 1]."""
        logits = self._logits(tokens)
        if logits.shape[0] == len(tokens):
            return logits
        # Last-token logits only (kv-cache logits=last): a concat graph reads the text one token a step
        # through its own cache; any other graph, one run per prefix.
        stepped = self._through_cache(tokens)
        if stepped is not None:
            return stepped
        return np.stack([self._logits(tokens[: t + 1])[-1] for t in range(len(tokens))])

    def _through_cache(self, tokens: np.ndarray) -> np.ndarray | None:
        """Row t from the step that feeds token t after the cache of tokens[:t]; None without a concat cache."""
        from qgraph.verify.cache_steps import initial_state, next_state, step_feeds
        from qgraph.verify.kv_contract import KVLayoutError, detect_kv_layout

        try:
            layout = detect_kv_layout(self.model)
        except KVLayoutError:
            return None
        if layout.style != "concat" or layout.n_kv_heads is None or layout.head_dim is None:
            return None
        text = _Text(np.asarray(tokens, np.int64)[None])
        state = initial_state(layout, 1, None)
        rows = []
        for t in range(len(tokens)):
            feeds, fed = step_feeds(layout, text, t, t + 1, state)
            out = self.runner.run(feeds)
            rows.append(np.asarray(out["logits"], np.float64)[0, -1])
            state = next_state(layout, out, state, t, fed)
        return np.stack(rows)

    def continue_greedily(self, tokens: np.ndarray, total: int) -> np.ndarray:
        while len(tokens) < total:
            tokens = np.append(tokens, np.int64(np.argmax(self._logits(tokens)[-1])))
        return tokens

    def close(self) -> None:
        self.runner.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _check_decoder(reference: ir.Model, candidate: ir.Model, budget: Budget) -> BudgetResult:
    ref = _Decoder(reference, "the reference")
    cand = _Decoder(candidate, "the candidate")
    try:
        text = ref.continue_greedily(fixed_text(_vocab(reference)), max(budget.text_tokens, _PROMPT + 2))
        ref_logits, cand_logits = ref.all_positions(text), cand.all_positions(text)
    finally:
        ref.close()
        cand.close()
    # Predictions of the continuation: positions prompt-1 .. len-2 score tokens prompt .. len-1.
    rows = np.arange(_PROMPT - 1, len(text) - 1)
    targets = text[rows + 1]
    agreement = float(np.mean(np.argmax(ref_logits[rows], -1) == np.argmax(cand_logits[rows], -1)))
    ppl_ref = float(np.exp(-np.mean(_log_softmax(ref_logits[rows])[np.arange(len(rows)), targets])))
    ppl_cand = float(np.exp(-np.mean(_log_softmax(cand_logits[rows])[np.arange(len(rows)), targets])))
    result = BudgetResult(True, "decoder", budget, agreement, ppl_ref, ppl_cand)
    result.within = agreement >= budget.token_agreement and (result.perplexity_rise or 0.0) <= budget.perplexity_rise
    return result


def _check_outputs(reference: ir.Model, candidate: ir.Model, budget: Budget, **kwargs: Any) -> BudgetResult:
    from qgraph.verify.compare import Tolerance
    from qgraph.verify.equivalence import check_equivalent

    tolerance = Tolerance(budget.relative_error, budget.relative_error)
    tolerances = {v.name: tolerance for v in reference.graph.outputs
                  if v.dtype is not None and v.dtype.is_floating_point()}
    kwargs.setdefault("localize_divergence", False)
    kwargs.setdefault("save_artifacts", False)
    verdict = check_equivalent(reference, candidate, tolerances=tolerances, **kwargs)
    return BudgetResult(verdict.equivalent, "outputs", budget, detail=str(verdict))


def check_budget(
    reference: qio.ModelSource, candidate: qio.ModelSource, budget: Budget, **kwargs: Any
) -> BudgetResult:
    """Did ``candidate`` (an approximation of ``reference``) stay within ``budget``?

    Other keyword arguments go to :func:`qgraph.verify.check_equivalent`
    for graphs that are not decoders (``examples``, ``seed``...).
    """
    ref_model, cand_model = qio.load(reference), qio.load(candidate)
    if _is_decoder(ref_model) and _is_decoder(cand_model):
        return _check_decoder(ref_model, cand_model, budget)
    return _check_outputs(ref_model, cand_model, budget, **kwargs)

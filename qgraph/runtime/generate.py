"""Text generation with an exported or rewritten graph in onnxruntime.

The loop is the same for every graph form (:mod:`qgraph.runtime.engines`):
tokenize, left-pad the batch, prefill (in chunks where the graph fixes the
sequence length), then one decode step per token, greedy or sampled, until
every row produced an end-of-sequence token, reached ``max_new_tokens`` or
filled the graph's context. Text is streamed as it is produced (a token that
ends inside a multi-byte character is held back until the character is
complete), and the run is timed (:mod:`qgraph.runtime.stats`).

A graph whose batch is fixed (a device specialization) runs a larger batch
in groups of that size, one after another; the statistics add up.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qgraph.errors import BadInputError
from qgraph.runtime.engines import CacheBinding, Engine, make_engine
from qgraph.runtime.session import DEFAULT_THREADS, ModelFolder
from qgraph.runtime.stats import Clock, LatencyStats, StatsRecorder

__all__ = ["GenerationResult", "Generator", "SamplingConfig", "TokenSampler", "load_generator"]

STOP_EOS, STOP_LENGTH, STOP_CONTEXT = "eos", "length", "context"


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen: greedy (temperature 0) or sampled with top-k / top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise BadInputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise BadInputError(f"top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise BadInputError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k is not None:
            parts.append(f"top-k {self.top_k}")
        if self.top_p is not None:
            parts.append(f"top-p {self.top_p:g}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        return "sampled, " + ", ".join(parts)


class TokenSampler:
    """Picks one token per row from logits [B, V]; a seeded sampler repeats its choices exactly."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.config.greedy:  # on the logits' own dtype: widening is exact and keeps the order
            return np.asarray(logits).argmax(axis=-1).astype(np.int64)
        logits = np.asarray(logits, np.float64)
        return np.array([self._sample(row) for row in logits], np.int64)

    def _sample(self, logits: np.ndarray) -> int:
        scaled = logits / self.config.temperature
        if self.config.top_k is not None and self.config.top_k < scaled.size:
            kth = np.partition(scaled, -self.config.top_k)[-self.config.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.config.top_p is not None and self.config.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.config.top_p)) + 1]  # smallest set reaching top_p
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(self.rng.choice(probs.size, p=probs))


@dataclasses.dataclass
class GenerationResult:
    """Per row: prompt ids, generated ids (an end-of-sequence token included), text, why it stopped."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str]
    stop_reasons: list[str]
    stats: LatencyStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [
                {"prompt_ids": p, "token_ids": t, "text": x, "stop_reason": r}
                for p, t, x, r in zip(self.prompt_ids, self.token_ids, self.texts, self.stop_reasons, strict=True)
            ],
            "stats": self.stats.to_dict(),
        }


TokenCallback = Callable[[int, int], None]  # (row, token id)
TextCallback = Callable[[int, str], None]  # (row, new text)


class _TextStream:
    """Turns each row's growing token list into the new text to show."""

    def __init__(self, tokenizer: Any, batch: int, on_text: TextCallback) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.shown = [""] * batch

    def __call__(self, row: int, token: int) -> None:
        self.ids[row].append(token)
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest
        if text.startswith(self.shown[row]):
            piece = text[len(self.shown[row]):]
        else:  # the tokenizer re-read earlier text differently; show the new tail
            piece = text[len(os.path.commonprefix([text, self.shown[row]])):]
        if piece:
            self.shown[row] = text
            self.on_text(row, piece)


class Generator:
    """Generates with one engine; holds the tokenizer and the end-of-sequence ids."""

    def __init__(self, engine: Engine, tokenizer: Any = None, eos_token_ids: Sequence[int] = (), *,
                 prefill_chunk: int | None = None, clock: Clock | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        # Padding is masked (or written to the retained cache's spare slot), so its id only has to be a
        # row of the embedding table; a tokenizer's pad token may lie beyond it (Qwen's is id len(vocab)).
        self.pad_token_id = 0
        self.prefill_chunk = prefill_chunk
        self.clock = clock

    # -- text in, text out -----------------------------------------------------------------

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise BadInputError("this generator has no tokenizer; give token ids")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise BadInputError("--chat: the tokenizer has no chat template")
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                 chat: bool = False, on_text: TextCallback | None = None) -> GenerationResult:
        """Generate a continuation of each prompt; ``on_text(row, piece)`` streams the text."""
        recorder = StatsRecorder(self.clock)
        prompt_ids = [self.encode(p, chat=chat) for p in prompts]
        stream = _TextStream(self.tokenizer, len(prompts), on_text) if on_text is not None else None
        return self.generate_ids(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, on_token=stream,
                                 recorder=recorder)

    # -- ids in, ids out ------------------------------------------------------------------

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     sampling: SamplingConfig | None = None, on_token: TokenCallback | None = None,
                     recorder: StatsRecorder | None = None) -> GenerationResult:
        """Generate from token ids; ``on_token(row, id)`` sees every token as it is chosen."""
        if not prompt_ids:
            raise BadInputError("no prompts given")
        if max_new_tokens < 1:
            raise BadInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        prompts = [[int(t) for t in p] for p in prompt_ids]
        for row, p in enumerate(prompts):
            if not p:
                raise BadInputError(f"prompt {row} is empty (no tokens)")
            if self.engine.max_tokens is not None and len(p) > self.engine.max_tokens:
                raise BadInputError(f"prompt {row} has {len(p)} tokens; {self.engine.label} holds at most "
                                    f"{self.engine.max_tokens}")
        sampler = TokenSampler(sampling or SamplingConfig())
        group = self.engine.fixed_batch or len(prompts)
        tokens: list[list[int]] = []
        reasons: list[str] = []
        parts: list[LatencyStats] = []
        for first in range(0, len(prompts), group):
            rows = prompts[first:first + group]
            filler = [rows[0]] * (group - len(rows))  # a fixed batch is filled up with copies; results dropped

            def forward(row: int, token: int, first: int = first, real: int = len(rows)) -> None:
                if on_token is not None and row < real:
                    on_token(first + row, token)

            rec = recorder if recorder is not None and first == 0 else StatsRecorder(self.clock)
            got, why, stats = self._generate_group(rows + filler, len(rows), max_new_tokens, sampler, forward, rec)
            tokens += got
            reasons += why
            parts.append(stats)
        texts = [self._decode(t) for t in tokens]
        stats = LatencyStats.combine(parts)
        if recorder is not None:  # the end-to-end time includes tokenizing and detokenizing
            stats = dataclasses.replace(stats, end_to_end=recorder.clock() - recorder.started)
        return GenerationResult(prompts, tokens, texts, reasons, stats)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _generate_group(self, prompts: list[list[int]], real: int, max_new_tokens: int, sampler: TokenSampler,
                        on_token: TokenCallback, recorder: StatsRecorder) -> tuple[list[list[int]], list[str],
                                                                                   LatencyStats]:
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        tokens = np.full((batch, width), self.pad_token_id, np.int64)
        valid = np.zeros((batch, width), bool)
        for row, p in enumerate(prompts):  # left padding: every row's last prompt token in the last column
            tokens[row, width - len(p):] = p
            valid[row, width - len(p):] = True
        # A generated token is fed back (and needs a slot) unless it is the last one.
        capacity = self.engine.max_tokens
        limits = [max_new_tokens if capacity is None else min(max_new_tokens, capacity - len(p) + 1) for p in prompts]

        generated: list[list[int]] = [[] for _ in range(batch)]
        reasons = [""] * batch
        done = np.zeros(batch, bool)

        def accept(chosen: np.ndarray) -> None:
            for row in np.flatnonzero(~done):
                token = int(chosen[row])
                generated[row].append(token)
                on_token(int(row), token)
                if token in self.eos_token_ids:
                    reasons[row] = STOP_EOS
                elif len(generated[row]) >= limits[row]:
                    reasons[row] = STOP_LENGTH if limits[row] == max_new_tokens else STOP_CONTEXT
                else:
                    continue
                done[row] = True

        # A graph that samples on the device (pass 'sampler') returns token ids, not logits.
        on_device = getattr(self.engine, "samples_on_device", False)
        choose = (lambda ids: ids) if on_device else sampler
        if on_device:
            self.engine.use_sampling(sampler.config, sampler.rng)
        self.engine.start(batch)
        recorder.prefill_start()
        logits = self.engine.prefill(tokens, valid, self.prefill_chunk)
        chosen = choose(logits)
        recorder.prefill_runs = self.engine.runs
        recorder.first_token()
        accept(chosen)
        while not done[:real].all():
            active = ~done
            feed = np.where(active, chosen, self.pad_token_id)
            logits = self.engine.decode(feed, active)
            chosen = choose(logits)
            recorder.decode_step()
            accept(chosen)
        stats = recorder.finish(batch=real, prompt_tokens=sum(len(p) for p in prompts[:real]),
                                generated=[len(g) for g in generated[:real]])
        return generated[:real], reasons[:real], stats


def load_generator(
    spec: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    threads: int = DEFAULT_THREADS,
    ctx_len: int | None = None,
    prefill_chunk: int | None = None,
    cache_binding: CacheBinding = "auto",
    clock: Clock | None = None,
) -> Generator:
    """A generator for an export folder (or an ``.onnx`` file with its tokenizer beside it)."""
    folder = ModelFolder.find(spec, tokenizer=tokenizer)
    tok = folder.tokenizer()
    engine = make_engine(folder.model_path, threads=threads, specializations=folder.specializations(),
                         config=folder.config(), ctx_len=ctx_len, cache_binding=cache_binding)
    return Generator(engine, tok, sorted(folder.eos_token_ids(tok)), prefill_chunk=prefill_chunk, clock=clock)

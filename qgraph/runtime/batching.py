"""Continuous batching: N cache rows kept busy with a stream of requests.

A continuous-batching graph (``batch_index`` input, made by ``kv-cache``
with ``full_batch_size=N``) keeps N sequences in the rows of one cache. The
server loop here is the one a serving runtime runs:

* a free row takes the next request at once: its prompt is prefilled alone
  (batch 1, ``batch_index`` = that row), whatever the row held before;
* all rows decode together (batch N), rows without a request fed padding
  (position -1, which the graph never writes);
* a request leaves its row when it ends (end-of-sequence, its token budget,
  or the context), and the next one is prefilled into it before the next
  decode step.

Each request's tokens are what it gives alone: its row holds only its own
positions, and the mask shows a query only the slots up to its position.
The tests check that against generating each prompt by itself.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from qgraph.errors import BadInputError
from qgraph.runtime.engines import RetainedEngine
from qgraph.runtime.generate import (
    STOP_CONTEXT,
    STOP_EOS,
    STOP_LENGTH,
    GenerationResult,
    Generator,
    SamplingConfig,
    TokenSampler,
)
from qgraph.runtime.stats import Clock

__all__ = ["ServingStats", "serve"]


@dataclasses.dataclass(frozen=True)
class ServingStats:
    """What serving a stream of requests cost; times in seconds."""

    requests: int
    slots: int
    prompt_tokens: int
    generated_tokens: int
    prefill_runs: int
    decode_steps: int
    seconds: float
    busy_slot_steps: int  # decode steps x rows that held a request: how full the batch ran
    prefill_seconds: float = 0.0  # in prefills (each until its request's first token)
    decode_seconds: float = 0.0  # in decode steps

    @property
    def mean_ttft(self) -> float:
        """Mean time of a request's prefill (its time to first token once it has a row)."""
        return self.prefill_seconds / self.requests if self.requests else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        tokens = self.generated_tokens - self.requests  # each request's first token comes from its prefill
        return tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def occupancy(self) -> float:
        return self.busy_slot_steps / (self.decode_steps * self.slots) if self.decode_steps else float("nan")

    def format(self) -> str:
        return (f"{self.requests} requests in {self.slots} slots: {self.generated_tokens} tokens in "
                f"{self.seconds:.3f} s = {self.tokens_per_second:.1f} tokens/s; {self.prefill_runs} prefill runs, "
                f"{self.decode_steps} decode steps, slots {100 * self.occupancy:.0f}% busy")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(tokens_per_second=self.tokens_per_second, occupancy=self.occupancy, mean_ttft=self.mean_ttft,
                    decode_tokens_per_second=self.decode_tokens_per_second)
        return data


def serve(generator: Generator, prompt_ids: Sequence[Sequence[int]], *, slots: int, max_new_tokens: int = 64,
          sampling: SamplingConfig | None = None, on_token=None, clock: Clock | None = None) -> GenerationResult:
    """Generate every prompt through ``slots`` cache rows, a new request entering as soon as a row is free.

    ``on_token(request, token)`` sees each token as it is chosen. The
    result's ``stats`` are :class:`ServingStats`.
    """
    import time

    engine = generator.engine
    if not isinstance(engine, RetainedEngine) or not engine.layout.continuous_batching:
        raise BadInputError(f"{engine.label}: --full-batch-size needs a continuous-batching graph (a batch_index "
                            "input: kv-cache with full_batch_size=N)")
    if slots < 1:
        raise BadInputError(f"--full-batch-size must be at least 1, got {slots}")
    if engine.layout.cache_batch is not None and engine.layout.cache_batch != slots:
        raise BadInputError(f"{engine.label} has {engine.layout.cache_batch} cache rows; --full-batch-size {slots}")
    if max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if not prompts:
        raise BadInputError("no prompts given")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise BadInputError(f"prompt {index} is empty (no tokens)")
        if engine.max_tokens is not None and len(prompt) > engine.max_tokens:
            raise BadInputError(f"prompt {index} has {len(prompt)} tokens; {engine.label} holds at most "
                                f"{engine.max_tokens}")
    clock = clock or time.perf_counter
    sampler = TokenSampler(sampling or SamplingConfig())
    # A graph with the sampler inside (pass 'sampler') returns token ids, each row with its own penalty buffers.
    on_device = getattr(engine, "samples_on_device", False)
    if on_device:
        engine.use_sampling(sampler.config, sampler.rng)
    choose = (lambda out: np.asarray(out, np.int64)) if on_device else sampler
    capacity = engine.max_tokens
    limits = [max_new_tokens if capacity is None else min(max_new_tokens, capacity - len(p) + 1) for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    reasons = [""] * len(prompts)

    def accept(request: int, token: int) -> bool:
        """Record a token; True when the request is done."""
        generated[request].append(token)
        if on_token is not None:
            on_token(request, token)
        if token in generator.eos_token_ids:
            reasons[request] = STOP_EOS
        elif len(generated[request]) >= limits[request]:
            reasons[request] = STOP_LENGTH if limits[request] == max_new_tokens else STOP_CONTEXT
        else:
            return False
        return True

    started = clock()
    engine.start_slots(slots)
    queue = collections.deque(range(len(prompts)))
    free = list(range(slots))
    active: dict[int, int] = {}  # cache row -> request
    last = np.full(slots, generator.pad_token_id, np.int64)
    prefill_runs = decode_steps = busy = 0
    prefill_seconds = decode_seconds = 0.0
    while queue or active:
        while queue and free:
            request, slot = queue.popleft(), free.pop(0)
            before, tick = engine.runs, clock()
            logits = engine.prefill_slot(slot, prompts[request], generator.prefill_chunk)
            token = int(choose(np.asarray(logits)[None])[0])
            prefill_runs += engine.runs - before
            prefill_seconds += clock() - tick
            if accept(request, token):
                free.append(slot)
            else:
                active[slot], last[slot] = request, token
        if not active:
            continue
        running = np.zeros(slots, bool)
        running[list(active)] = True
        tick = clock()
        logits = engine.decode(np.where(running, last, generator.pad_token_id), running)
        chosen = choose(logits)
        decode_seconds += clock() - tick
        decode_steps += 1
        busy += len(active)
        for slot in sorted(active):
            request = active[slot]
            if accept(request, int(chosen[slot])):
                del active[slot]
                free.append(slot)
            else:
                last[slot] = chosen[slot]
    seconds = clock() - started
    stats = ServingStats(len(prompts), slots, sum(map(len, prompts)), sum(map(len, generated)), prefill_runs,
                         decode_steps, seconds, busy, prefill_seconds, decode_seconds)
    texts = [generator.tokenizer.decode(t, skip_special_tokens=True) if generator.tokenizer is not None else ""
             for t in generated]
    return GenerationResult(prompts, generated, texts, reasons, stats)

"""Greedy speculative decoding: a draft graph proposes K tokens, the target scores K+1 in one run.

Each round, per row: the draft (any smaller retained-state decoder over the
same vocabulary -- the first layers of the target, say, from
``qgraph truncate``) greedily proposes d1..dK; the target (a kv-cache graph
made with ``num_speculative_tokens=K``, or one returning every position)
runs once on [t0, d1..dK] and gives its greedy choices g0..gK; the longest
prefix with d(j+1) == g(j) is accepted (a tokens) and g0..ga are emitted --
exactly the tokens plain greedy decoding with the target would give, since
each g(j) is the target's choice after a prefix that equals its own output.

Roll-back is free in the retained form: a query at position p reads only
slots <= p, and every round writes slots from the first rejected position
on before reading them, so a rejected token's K/V is never visible. Rolling
back is therefore only moving each engine's count of seen tokens
(:meth:`RetainedEngine.rewind`) -- a concat cache would have to be cut,
which is why both graphs must be retained-state.

The draft may lag by a token or two: it has never been fed the bonus token
g(a), nor dK when every proposal was accepted; those wait in ``pending`` and
are fed, as one short chunk, at the start of its next round.

K shrinks near the end of a row's budget (no proposal past the last token
wanted) and of either context (no write past the last slot); at K = 0 a
round is a plain target decode step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from qgraph.errors import BadInputError
from qgraph.runtime.engines import CacheBinding, Engine, RetainedEngine, make_engine
from qgraph.runtime.generate import STOP_CONTEXT, STOP_EOS, STOP_LENGTH, Generator, TokenSampler, load_generator
from qgraph.runtime.session import DEFAULT_THREADS, ModelFolder
from qgraph.runtime.stats import Clock, LatencyStats, StatsRecorder

__all__ = ["SpeculativeGenerator", "SpeculativeStats", "load_speculative_generator"]


@dataclasses.dataclass
class SpeculativeStats:
    """What speculation achieved: proposals made and accepted, target runs, time in each graph."""

    k: int
    rounds: int = 0  # target runs after the prefill (one per round)
    proposed: int = 0  # draft tokens scored by the target, summed over rows
    accepted: int = 0  # of those, the ones the target agreed with
    emitted: int = 0  # tokens produced by rounds (accepted + the target's own), summed over rows
    row_rounds: int = 0  # rounds summed over the rows taking part in them
    draft_runs: int = 0
    draft_seconds: float = 0.0
    target_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row gains per target run (1 = no gain over plain decoding), averaged over row-rounds."""
        return self.emitted / self.row_rounds if self.row_rounds else float("nan")

    def format(self) -> str:
        return (f"speculative (K={self.k}): acceptance {self.accepted}/{self.proposed} = {self.acceptance_rate:.1%}, "
                f"{self.tokens_per_round:.2f} tokens per target run, {self.rounds} target run(s), "
                f"{self.draft_runs} draft run(s); draft {self.draft_seconds:.3f} s, target {self.target_seconds:.3f} s")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(acceptance_rate=None if self.proposed == 0 else self.acceptance_rate,
                    tokens_per_round=None if self.row_rounds == 0 else self.tokens_per_round)
        return data


def _last_valid_logits(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[B, V] at each row's last valid column, from logits [B, w, V] or [B, 1, V] (already the last)."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
    return logits[np.arange(logits.shape[0]), last]


class SpeculativeGenerator(Generator):
    """A :class:`Generator` whose decode loop is greedy speculative decoding with a draft engine."""

    def __init__(self, engine: Engine, draft: Engine, k: int, tokenizer: Any = None,
                 eos_token_ids: Sequence[int] = (), *, prefill_chunk: int | None = None,
                 clock: Clock | None = None) -> None:
        super().__init__(engine, tokenizer, eos_token_ids, prefill_chunk=prefill_chunk, clock=clock)
        for role, e in (("target", engine), ("draft", draft)):
            if not isinstance(e, RetainedEngine):
                raise BadInputError(f"--draft/--speculative-tokens: the {role} {e.label} is a {e.kind} graph; "
                                    "speculative decoding needs retained-state graphs (rejected tokens are rolled "
                                    "back by position), e.g. `qgraph optimize --preset qaic`")
        if k < 0:
            raise BadInputError(f"--speculative-tokens must be >= 0, got {k}")
        if k > 0 and not engine.layout.keeps_logits and engine.layout.logits_seq == 1:
            raise BadInputError(f"--speculative-tokens: the target {engine.label} returns the last token's logits "
                                "only; make it with the kv-cache option num_speculative_tokens=K (input "
                                "num_logits_to_keep) or logits=all")
        if draft.fixed_batch != engine.fixed_batch:
            raise BadInputError(f"--draft: the draft's batch ({draft.fixed_batch or 'symbolic'}) differs from the "
                                f"target's ({engine.fixed_batch or 'symbolic'})")
        vocab = (engine.layout.vocab, draft.layout.vocab)
        if None not in vocab and vocab[0] != vocab[1]:
            raise BadInputError(f"--draft: the draft's vocabulary ({vocab[1]}) differs from the target's ({vocab[0]})")
        self.draft = draft
        self.k = k
        self.speculation = SpeculativeStats(k)

    def _generate_group(self, prompts, real, max_new_tokens, sampler: TokenSampler, on_token, recorder: StatsRecorder
                        ) -> tuple[list[list[int]], list[str], LatencyStats]:
        if not sampler.config.greedy:
            raise BadInputError("--speculative-tokens: speculative decoding here is greedy only (temperature 0)")
        target, draft, spec = self.engine, self.draft, self.speculation
        clock = recorder.clock
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        tokens = np.full((batch, width), self.pad_token_id, np.int64)
        valid = np.zeros((batch, width), bool)
        for row, p in enumerate(prompts):
            tokens[row, width - len(p):] = p
            valid[row, width - len(p):] = True
        limits = [min(max_new_tokens, target.max_tokens - len(p) + 1) for p in prompts]
        for row, p in enumerate(prompts):
            if len(p) > draft.max_tokens:
                raise BadInputError(f"prompt {row} has {len(p)} tokens; the draft {draft.label} holds at most "
                                    f"{draft.max_tokens}")

        generated: list[list[int]] = [[] for _ in range(batch)]
        reasons = [""] * batch
        done = np.zeros(batch, bool)

        def emit(row: int, chosen: Sequence[int]) -> int:
            """Append tokens to a row until EOS or its limit; how many were taken."""
            taken = 0
            for token in chosen:
                generated[row].append(int(token))
                on_token(row, int(token))
                taken += 1
                if token in self.eos_token_ids:
                    reasons[row] = STOP_EOS
                elif len(generated[row]) >= limits[row]:
                    reasons[row] = STOP_LENGTH if limits[row] == max_new_tokens else STOP_CONTEXT
                else:
                    continue
                done[row] = True
                break
            return taken

        target.start(batch)
        draft.start(batch)
        recorder.prefill_start()
        first = sampler(target.prefill(tokens, valid, self.prefill_chunk))
        draft.prefill(tokens, valid, self.prefill_chunk)
        recorder.prefill_runs = target.runs
        recorder.first_token()
        pending: list[list[int]] = [[] for _ in range(batch)]  # tokens the draft has not been fed yet
        for row in range(batch):
            emit(row, [first[row]])
            pending[row].append(int(first[row]))

        while not done[:real].all():
            active = ~done
            rows = np.flatnonzero(active)
            k = self._round_k(rows, generated, limits, pending)
            target_seen = target.seen.copy()
            draft_seen = draft.seen.copy()
            proposals = np.zeros((batch, k), np.int64)
            if k:
                started = clock()
                span = max(len(pending[r]) for r in rows)
                feed = np.full((batch, span), self.pad_token_id, np.int64)
                fed = np.zeros((batch, span), bool)
                for r in rows:
                    feed[r, :len(pending[r])] = pending[r]
                    fed[r, :len(pending[r])] = True
                # _step: one run of any width, rows without a valid token included (prefill() refuses those)
                proposals[:, 0] = _last_valid_logits(draft._step(feed, fed), fed).argmax(-1)
                for j in range(1, k):
                    proposals[:, j] = draft.decode(np.where(active, proposals[:, j - 1], self.pad_token_id),
                                                   active).argmax(-1)
                spec.draft_runs += k
                spec.draft_seconds += clock() - started
            started = clock()
            last = np.array([generated[r][-1] if generated[r] else self.pad_token_id for r in range(batch)])
            scored = np.concatenate([last[:, None], proposals], axis=1)
            target.keep = k + 1
            try:
                logits = target._step(scored, np.repeat(active[:, None], k + 1, axis=1))
            finally:
                target.keep = 1
            if logits.shape[1] != k + 1:
                raise BadInputError(f"{target.label}: logits have {logits.shape[1]} position(s) for {k + 1} scored "
                                    "tokens; the target must keep K+1 logits")
            choice = logits.argmax(-1)  # [B, k+1]: the target's greedy token after each scored prefix
            spec.target_seconds += clock() - started
            spec.rounds += 1
            new_target, new_draft = target.seen.copy(), draft.seen.copy()
            for r in rows:
                agree = proposals[r] == choice[r, :k]
                a = int(np.argmin(agree)) if not agree.all() else k  # longest agreeing prefix
                spec.proposed += k
                spec.accepted += a
                spec.row_rounds += 1
                spec.emitted += emit(int(r), choice[r, :a + 1].tolist())
                new_target[r] = target_seen[r] + 1 + a  # t0 and the accepted proposals stay in the cache
                if k == 0:
                    pending[r].append(int(choice[r, 0]))
                    continue
                # The draft was fed pending and d1..d(k-1); it keeps pending and d1..d(min(a, k-1)).
                new_draft[r] = draft_seen[r] + len(pending[r]) + min(a, k - 1)
                pending[r] = ([int(proposals[r, k - 1])] if a == k else []) + [int(choice[r, a])]
            target.rewind(new_target)
            draft.rewind(new_draft)
            recorder.decode_step()
        stats = recorder.finish(batch=real, prompt_tokens=sum(len(p) for p in prompts[:real]),
                                generated=[len(g) for g in generated[:real]])
        return generated[:real], reasons[:real], stats

    def _round_k(self, rows: np.ndarray, generated: list[list[int]], limits: list[int],
                 pending: list[list[int]]) -> int:
        """K for this round: no proposal beyond a row's last wanted token or past either cache's last slot."""
        k = self.k
        for r in rows:
            k = min(k, limits[r] - len(generated[r]) - 1,
                    self.engine.max_tokens - 1 - int(self.engine.seen[r]),
                    self.draft.max_tokens - int(self.draft.seen[r]) - len(pending[r]) + 1)
        return max(k, 0)


def load_speculative_generator(
    spec: str | os.PathLike[str],
    draft: str | os.PathLike[str],
    k: int,
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    threads: int = DEFAULT_THREADS,
    ctx_len: int | None = None,
    prefill_chunk: int | None = None,
    cache_binding: CacheBinding = "auto",
    clock: Clock | None = None,
) -> SpeculativeGenerator:
    """Target folder (or .onnx) and draft folder (or .onnx): the tokenizer and EOS ids come from the target's."""
    folder = ModelFolder.find(spec, tokenizer=tokenizer)
    plain = load_generator(spec, tokenizer=tokenizer, threads=threads, ctx_len=ctx_len, cache_binding=cache_binding)
    tok, target = plain.tokenizer, plain.engine
    draft_folder = ModelFolder.find(draft)
    draft_engine = make_engine(draft_folder.model_path, threads=threads,
                               specializations=draft_folder.specializations(),
                               config=draft_folder.config() or folder.config(), ctx_len=ctx_len,
                               cache_binding=cache_binding, label=f"draft {draft_folder.model_path}")
    return SpeculativeGenerator(target, draft_engine, k, tok, sorted(folder.eos_token_ids(tok)),
                                prefill_chunk=prefill_chunk, clock=clock)

"""Driving a KV-cached graph step by step, and a cached graph as the reference of a replay.

A sequence replay (:mod:`qgraph.verify.sequence`) feeds a cached graph one
chunk at a time: what each step is fed and how its cache outputs become the
next step's inputs depend only on the graph's KV layout
(:mod:`qgraph.verify.kv_contract`), so the functions here serve every
cached graph the replay drives.

:class:`CachedReference` is the reference when the graph *before* a pass
already had a cache -- an optimum-style export (``past_key_values.*`` ->
``present.*``) that ``kv-cache`` converts to the retained form. There is no
no-cache graph to compare with, so the reference's logits come from
replaying the same tokens through its own cache: in the same split as the
candidate when it returns logits at every position, else one token a step
(a last-token graph then returns each column's own logits). Both graphs
are thus replayed against each other, which is what "the conversion kept
the meaning" means: the same tokens through either cache give the same
logits at every valid position.

Positions follow docs/design.md (``cumsum(mask) - 1``). A concat reference
without a ``position_ids`` input counts positions itself, so a row with
padding before its tokens is replayed alone, unpadded, as for a no-cache
reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from qgraph.verify.kv_contract import KVLayout
from qgraph.verify.runner import OrtRunner

__all__ = ["CachedReference", "CacheStepError", "hf_positions", "initial_state", "next_state", "step_feeds"]

PAD_TOKEN = 0  # token id fed in the slots a static-seq chunk is padded with


class CacheStepError(ValueError):
    """A cached graph's step did not give what its layout promises (shapes of the cache or the logits)."""


class Rows(Protocol):
    """What a step needs of a case: tokens and valid [batch, total], positions (cumsum(valid) - 1, -1 on padding)."""

    tokens: np.ndarray
    valid: np.ndarray

    @property
    def positions(self) -> np.ndarray: ...


class _Rows:
    def __init__(self, tokens: np.ndarray, valid: np.ndarray) -> None:
        self.tokens, self.valid = tokens, valid

    @property
    def positions(self) -> np.ndarray:
        return np.where(self.valid, np.cumsum(self.valid, axis=1) - 1, -1).astype(np.int64)


def hf_positions(mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Hugging Face's position ids for the last ``seq_len`` columns: cumsum(mask) - 1, padding 1."""
    m = mask.astype(np.int64)
    pos = np.where(m == 0, 1, np.cumsum(m, axis=1) - 1)
    return pos[:, m.shape[1] - seq_len :]


def initial_state(layout: KVLayout, batch: int, ctx_len: int | None) -> dict[str, np.ndarray]:
    """An empty cache: zeros of ctx_len slots (retained) or a past of length 0 (concat)."""
    length = ctx_len if layout.style == "retained" else 0
    shape = (batch, layout.n_kv_heads, length, layout.head_dim)
    return {name: np.zeros(shape, layout.cache_dtype) for pair in layout.past for name in pair}


def step_feeds(
    layout: KVLayout, case: Rows, start: int, stop: int, state: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int]:
    """The feeds of the step over columns [start, stop) and the seq length fed (padded to a static seq dim)."""
    ids = case.tokens[:, start:stop]
    feeds: dict[str, np.ndarray] = dict(state)
    if layout.style == "retained":
        pos = case.positions[:, start:stop]
        fed_len = layout.seq_len if layout.seq_len is not None else stop - start
        extra = fed_len - (stop - start)
        if extra:
            ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=PAD_TOKEN)
            pos = np.pad(pos, ((0, 0), (0, extra)), constant_values=-1)
        feeds["position_ids"] = pos.astype(layout.positions_dtype)
    else:
        fed_len = stop - start
        mask = case.valid[:, :stop]
        feeds["attention_mask"] = mask.astype(layout.mask_dtype)
        if layout.has_position_ids:
            feeds["position_ids"] = hf_positions(mask, fed_len).astype(layout.positions_dtype)
    feeds["input_ids"] = ids.astype(layout.ids_dtype)
    return feeds, fed_len


def next_state(
    layout: KVLayout, out: dict[str, np.ndarray], state: dict[str, np.ndarray], past_len: int, fed_len: int
) -> dict[str, np.ndarray]:
    """The cache outputs fed back as the next step's cache inputs; raises CacheStepError on a wrong shape."""
    nxt: dict[str, np.ndarray] = {}
    for past_pair, present_pair in zip(layout.past, layout.present):
        for past_name, present_name in zip(past_pair, present_pair):
            value = out[present_name]
            before = state[past_name].shape
            if layout.style == "retained":
                expected = before
                what = "the same shape as its input"
            else:
                expected = (*before[:2], past_len + fed_len, before[3])
                what = f"past {past_len} + seq {fed_len} = {past_len + fed_len} positions on axis 2"
            if tuple(value.shape) != tuple(expected):
                raise CacheStepError(
                    f"{present_name} has shape {tuple(value.shape)}; expected {tuple(expected)} ({what})"
                )
            nxt[past_name] = value
    return nxt


def _steps(split: Sequence[int], stop: int) -> list[tuple[int, int]]:
    """The (start, stop) columns of ``split`` cut at column ``stop``."""
    out, start = [], 0
    for k in split:
        end = min(start + k, stop)
        if end > start:
            out.append((start, end))
        start += k
    return out


class CachedReference:
    """Reference logits [batch, stop, vocab] from replaying the tokens through a cached graph.

    Errors (onnxruntime failures, a step whose cache or logits have the
    wrong shape) propagate as ``RunError`` or :class:`CacheStepError`: the
    caller decides whose fault a failing reference is.
    """

    def __init__(self, layout: KVLayout, runner: OrtRunner, ctx_len: int | None, label: str) -> None:
        self.layout, self.runner, self.ctx_len, self.label = layout, runner, ctx_len, label
        # A graph whose logits have one position (the retained default) gives each column's
        # logits only when that column is the last of its step: replay it one token a step.
        self.every_position = layout.logits_seq != 1

    def logits(self, case: Rows, split: Sequence[int], stop: int) -> np.ndarray:
        rows = _Rows(np.asarray(case.tokens)[:, :stop], np.asarray(case.valid, bool)[:, :stop])
        steps = _steps(split, stop) if self.every_position else [(c, c + 1) for c in range(stop)]
        logits = self._replay(rows, steps)
        if self.layout.style == "concat" and not self.layout.has_position_ids:
            logits = self._unpadded_rows(rows, logits)
        return logits

    def _replay(self, rows: Rows, steps: list[tuple[int, int]]) -> np.ndarray:
        batch, stop = rows.tokens.shape
        state = initial_state(self.layout, batch, self.ctx_len)
        logits: np.ndarray | None = None
        past_len = 0
        for start, end in steps:
            feeds, fed_len = step_feeds(self.layout, rows, start, end, state)
            out = self.runner.run(feeds)
            step_logits = out["logits"]
            if step_logits.ndim != 3 or step_logits.shape[0] != batch or step_logits.shape[1] not in (fed_len, 1):
                raise CacheStepError(
                    f"{self.label}: logits have shape {step_logits.shape}; expected [{batch}, {fed_len} or 1, vocab]"
                )
            if logits is None:
                # NaN where no logits were read: a valid column left unread fails the comparison loudly.
                logits = np.full((batch, stop, step_logits.shape[2]), np.nan, step_logits.dtype)
            if step_logits.shape[1] == fed_len:
                logits[:, start:end] = step_logits[:, : end - start]
            else:
                for b in range(batch):
                    cols = np.flatnonzero(rows.valid[b, start:end])
                    if cols.size:
                        logits[b, start + int(cols[-1])] = step_logits[b, 0]
            state = next_state(self.layout, out, state, past_len, fed_len)
            past_len += fed_len
        assert logits is not None  # steps cover at least one column
        return logits

    def _unpadded_rows(self, rows: Rows, logits: np.ndarray) -> np.ndarray:
        """A row with padding before a valid token gets the logits of its valid tokens replayed alone."""
        out = None
        for row in range(rows.tokens.shape[0]):
            columns = np.flatnonzero(rows.valid[row])
            if columns.size == 0 or columns[-1] == columns.size - 1:
                continue  # no valid token, or all of them first: no shift
            alone = _Rows(rows.tokens[row, columns][None], np.ones((1, columns.size), bool))
            steps = [(0, columns.size)] if self.every_position else [(c, c + 1) for c in range(columns.size)]
            out = logits.copy() if out is None else out
            out[row, columns] = self._replay(alone, steps)[0]
        return logits if out is None else out

"""Continuous batching checked the way a server uses it: requests interleaved in the cache's slots.

A continuous-batching graph (``batch_index`` input, docs/design.md) keeps
``full_batch_size`` sequences in the rows of one cache. A server prefills a
new request into whichever row is free -- a row that still holds an older,
finished sequence -- while the other rows are mid-decode, and decodes all
rows together, idle ones fed padding. The property: **every request's
logits equal what the no-cache graph gives for that request alone**, at
every position, whatever ran in the other rows or before it in its own.

:func:`replay_slots` runs one schedule (teacher-forced: each request's own
tokens are fed, so the check does not depend on what is sampled);
:func:`slot_schedules` draws schedules with hypothesis and
:func:`check_slots` returns the shrunk failing one.
"""

from __future__ import annotations

import collections
import dataclasses

import hypothesis
import numpy as np
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st

from qgraph.errors import BadInputError
from qgraph.verify.compare import Tolerance, compare_arrays
from qgraph.verify.runner import RunError
from qgraph.verify.scratch import private_hypothesis_home
from qgraph.verify.sequence import SequenceReplayer, _tolerance_for

__all__ = ["SlotRequest", "SlotSchedule", "SlotsResult", "check_slots", "replay_slots", "slot_schedules"]


@dataclasses.dataclass(frozen=True)
class SlotRequest:
    """One sequence: its first ``prompt_len`` tokens are prefilled, the rest decoded one a step."""

    tokens: tuple[int, ...]
    prompt_len: int

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_len <= len(self.tokens):
            raise BadInputError(f"prompt_len {self.prompt_len} must lie in 1..{len(self.tokens)}")


@dataclasses.dataclass(frozen=True)
class SlotSchedule:
    """Requests served in arrival order by ``slots`` cache rows, prompts in chunks of ``prefill_chunk``."""

    requests: tuple[SlotRequest, ...]
    slots: int
    prefill_chunk: int | None = None

    def describe(self) -> str:
        shapes = ", ".join(f"{len(r.tokens)} tokens ({r.prompt_len} prompt)" for r in self.requests)
        chunk = f", prefill chunks of {self.prefill_chunk}" if self.prefill_chunk else ""
        return f"{len(self.requests)} requests in {self.slots} slots{chunk}: {shapes}"


@dataclasses.dataclass(frozen=True)
class SlotCheck:
    request: int
    slot: int
    position: int
    step: int
    phase: str
    passed: bool
    max_abs_error: float
    reference_token: int
    candidate_token: int

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "MISMATCH"
        return (f"step {self.step} ({self.phase}) request {self.request} in slot {self.slot}, position "
                f"{self.position}: {verdict}, max |error| {self.max_abs_error:.3g}, greedy "
                f"{self.reference_token} vs {self.candidate_token}")


@dataclasses.dataclass
class SlotsResult:
    schedule: SlotSchedule
    checks: list[SlotCheck] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        lines = [f"{'equivalent' if self.passed else 'NOT equivalent'}: {self.schedule.describe()}; "
                 f"{len(self.checks)} positions compared"]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [f"  {c}" for c in self.checks if not c.passed][:5]
        return "\n".join(lines)


class _Slots:
    """The cache rows and what each holds; one onnxruntime run per prefill chunk or decode step."""

    def __init__(self, replayer: SequenceReplayer, schedule: SlotSchedule, tolerance: Tolerance | None) -> None:
        lay = replayer.layout
        if not lay.continuous_batching:
            raise BadInputError(f"{replayer.cached_label} has no batch_index input: not a continuous-batching graph")
        if lay.seq_len is not None:
            raise BadInputError(f"{replayer.cached_label} fixes seq_len at {lay.seq_len}; slot replay needs prefill "
                                "chunks and one-token decode steps from one graph")
        if lay.cache_batch is not None and lay.cache_batch != schedule.slots:
            raise BadInputError(f"{replayer.cached_label} has {lay.cache_batch} cache rows; the schedule uses "
                                f"{schedule.slots}")
        self.replayer, self.schedule, self.tolerance = replayer, schedule, tolerance
        shape = (schedule.slots, lay.n_kv_heads, replayer.ctx_len, lay.head_dim)
        self.state = {name: np.zeros(shape, lay.cache_dtype) for pair in lay.past for name in pair}
        self.result = SlotsResult(schedule)
        self.steps = 0

    def run(self, ids: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One step over ``rows`` of the cache; returns the logits and keeps the written state."""
        r, lay = self.replayer, self.replayer.layout
        feeds = dict(self.state)
        feeds["input_ids"] = ids.astype(lay.ids_dtype)
        feeds["position_ids"] = positions.astype(lay.positions_dtype)
        feeds.update(r.serving_feeds(len(rows), rows))
        out = r.cached_runner.run(feeds)
        for past_pair, present_pair in zip(lay.past, lay.present):
            for past, present in zip(past_pair, present_pair):
                self.state[past] = out[present]
        self.steps += 1
        return out["logits"]

    def compare(self, request: int, slot: int, position: int, phase: str, got: np.ndarray, want: np.ndarray) -> None:
        tol = self.tolerance or _tolerance_for(want.dtype, got.dtype)
        rep = compare_arrays(f"request {request} position {position}", want, got.astype(want.dtype), tol)
        self.result.checks.append(SlotCheck(request, slot, position, self.steps - 1, phase, rep.passed,
                                            float(rep.max_abs_error or 0.0), int(np.argmax(want)),
                                            int(np.argmax(got))))


def _logits_at(logits: np.ndarray, row: int, column: int, fed: int) -> np.ndarray:
    """The logits of ``column`` (a valid last column when the graph returns one position a row)."""
    return logits[row, column] if logits.shape[1] == fed else logits[row, 0]


def replay_slots(replayer: SequenceReplayer, schedule: SlotSchedule, *,
                 tolerance: Tolerance | None = None) -> SlotsResult:
    """Serve ``schedule`` through the continuous-batching graph and compare every request with it alone."""
    slots = _Slots(replayer, schedule, tolerance)
    references = [replayer.reference_logits(np.asarray(r.tokens)) for r in schedule.requests]
    for request in schedule.requests:
        if len(request.tokens) >= replayer.ctx_len:
            raise BadInputError(f"a request of {len(request.tokens)} tokens does not fit ctx_len {replayer.ctx_len} "
                                "(at most ctx_len - 1)")
    queue = collections.deque(range(len(schedule.requests)))
    free = list(range(schedule.slots))
    active: dict[int, list[int]] = {}  # slot -> [request, next column]
    try:
        while queue or active:
            while queue and free:  # a free row takes the next request, whatever it held before
                index, slot = queue.popleft(), free.pop(0)
                request = schedule.requests[index]
                chunk = schedule.prefill_chunk or request.prompt_len
                for start in range(0, request.prompt_len, chunk):
                    stop = min(start + chunk, request.prompt_len)
                    ids = np.asarray(request.tokens[start:stop])[None]
                    logits = slots.run(ids, np.arange(start, stop)[None], np.array([slot]))
                    slots.compare(index, slot, stop - 1, "prefill",
                                  _logits_at(logits, 0, stop - start - 1, stop - start), references[index][stop - 1])
                active[slot] = [index, request.prompt_len]
                if request.prompt_len == len(request.tokens):
                    del active[slot]
                    free.append(slot)
            if not active:
                continue
            ids = np.zeros((schedule.slots, 1), np.int64)
            positions = np.full((schedule.slots, 1), -1, np.int64)  # idle rows: padding, never written
            for slot, (index, column) in active.items():
                ids[slot, 0] = schedule.requests[index].tokens[column]
                positions[slot, 0] = column
            logits = slots.run(ids, positions, np.arange(schedule.slots))
            for slot, entry in sorted(active.items()):
                index, column = entry
                slots.compare(index, slot, column, "decode", _logits_at(logits, slot, 0, 1), references[index][column])
                entry[1] += 1
                if entry[1] == len(schedule.requests[index].tokens):
                    del active[slot]
                    free.append(slot)
    except (RunError, BadInputError) as exc:  # a failed run mid-schedule is a verdict, reported with it
        if isinstance(exc, BadInputError) and not slots.result.checks:
            raise
        slots.result.error = f"{type(exc).__name__}: {exc}"
    return slots.result


@st.composite
def slot_schedules(draw: st.DrawFn, *, vocab: int, max_len: int, slots: int | None = None,
                   max_requests: int = 6) -> SlotSchedule:
    """More requests than slots (so rows are reused), each of its own length and prompt."""
    n_slots = slots if slots is not None else draw(st.integers(1, 3))
    count = draw(st.integers(1, max(1, max_requests)))
    requests = []
    for _ in range(count):
        length = draw(st.integers(1, max_len))
        tokens = tuple(draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length)))
        requests.append(SlotRequest(tokens, draw(st.integers(1, length))))
    chunk = draw(st.one_of(st.none(), st.integers(1, 4)))
    return SlotSchedule(tuple(requests), n_slots, chunk)


def check_slots(replayer: SequenceReplayer, *, examples: int = 10, slots: int | None = None,
                max_len: int | None = None, seed: int = 0) -> SlotsResult | None:
    """Draw schedules; the first failing one (shrunk), or None when all passed."""
    lay = replayer.layout
    slots = slots if slots is not None else lay.cache_batch
    longest = min(max_len or 12, replayer.ctx_len - 1)
    vocab = replayer.vocab or 2
    failure: list[SlotsResult] = []

    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=False, database=None,
                         suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink],
                         print_blob=False)
    @hypothesis.seed(seed)
    @hypothesis.given(slot_schedules(vocab=vocab, max_len=longest, slots=slots))
    def prop(schedule: SlotSchedule) -> None:
        result = replay_slots(replayer, schedule)
        if not result.passed:
            failure[:] = [result]
            raise AssertionError(str(result))

    with private_hypothesis_home():
        try:
            prop()
        except AssertionError:
            return failure[0]
    return None

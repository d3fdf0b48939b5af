"""Sequence equivalence of a KV-cache graph with its no-cache reference.

docs/design.md states the correctness of both cache styles as one property:
replaying any token sequence through the cached graph in any split (a
prefill chunk, then chunks and single-token decode steps; batches with
padding) gives, at every valid position, the logits the no-cache graph gives
for the whole sequence. This module checks exactly that.

* :func:`replay` runs one case: tokens [batch, total_len], which of them are
  valid (left or right padding), and a split into chunk lengths.
* :class:`SequenceReplayer` holds the two onnxruntime sessions, so many
  cases run without reloading the graphs (:func:`replay` and
  :func:`check_sequence_equivalence` both use one).
* :func:`replay_cases` is the hypothesis strategy drawing cases;
  :func:`check_sequence_equivalence` runs it and returns the shrunk failing
  case with its per-step report.

How each style is driven (the style is read from the graph's names,
:mod:`qgraph.verify.kv_contract`):

* **retained**: the cache inputs start as zeros [batch, heads, ctx_len,
  head_dim]; after each step the ``*_RetainedState`` outputs become the next
  step's ``past_*`` inputs. ``position_ids`` are each token's position in its
  row's sequence (``cumsum(valid) - 1``) and -1 on padding. When the graph's
  seq dim is static (a fixed specialization), a shorter chunk is padded on
  the right with token 0 at position -1; a longer chunk is an error. A
  position must fit the cache: ``position < ctx_len`` (graphs that park
  padding writes in the last slot need ``total_len < ctx_len``, which is
  why :func:`check_sequence_equivalence` draws at most ``ctx_len - 1``
  tokens by default).
* **concat**: the past starts empty ([batch, heads, 0, head_dim]); after each
  step ``present.*`` is fed back and must have grown by the chunk length;
  ``attention_mask`` covers every column so far; ``position_ids`` follow
  Hugging Face's rule (``cumsum(mask) - 1``, padding 1).

Logits: a graph returning [batch, seq, vocab] is compared at every valid
position of the chunk; one returning [batch, 1, vocab] (the retained
contract's default: the row's last valid position, argmax of position_ids)
is compared at each row's last valid column of the chunk; a row without a
valid token in the chunk is not compared. A concat graph returning
[batch, 1, vocab] (``kv-cache`` ``logits=last``) returns the chunk's last
column, as Hugging Face's ``logits_to_keep=1`` does; its rows are
left-padded, so the check draws left padding for it (``padding="both"``
becomes ``"left"``) and compares that column wherever it is a valid token.
A retained graph with a ``num_logits_to_keep`` input (a speculative-decoding
target) is fed one of length ``logits_to_keep`` (default 1) every step and
returns [batch, n, vocab] at the columns QEfficient's contract names
(:func:`kept_columns`); each valid one is compared.

A reference that has a KV cache itself (the graph before ``kv-cache``
converted optimum's concat cache to the retained form) is replayed through
its own cache on the same tokens and split
(:class:`qgraph.verify.cache_steps.CachedReference`): both cached graphs are
then checked against each other, as there is no no-cache graph.

One reference run suffices. The reference runs once on the full sequence
with its attention mask (``reference_mode="full"``), not once per step on
the prefix: in a causal LM the logits at column t depend only on the tokens
and mask at columns <= t, and the positions the reference uses (computed or
fed by Hugging Face's rule) are a cumulative sum of the mask, which for a
column t is the same over the prefix as over the whole mask -- so left
padding (padding *before* the tokens, which shifts the positions) gives the
same positions either way, and right padding lies after every valid token
of its row, where no valid query looks. ``reference_mode="prefix"`` reruns
the reference on each prefix, for references that are not causal in this
sense (and to test the claim; the tests do).

Tolerance: :func:`qgraph.verify.compare.default_tolerance` of the logits
dtype (fp32: atol = rtol = 1e-4, atol scaled by max |reference logit| of
the position, at least 1), elementwise over the vocab at each position.
Greedy agreement (argmax equal) is reported for every position; it decides
the verdict only with ``require_greedy=True``, since a near-tie may flip
within tolerance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import time
from collections.abc import Sequence
from typing import Any, Literal, Self

import hypothesis
import numpy as np
import onnx_ir as ir
from hypothesis import HealthCheck, Phase, Verbosity
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample, Unsatisfiable
from hypothesis.extra import numpy as hnp

from qgraph import io as qio
from qgraph.errors import BadInputError
from qgraph.verify.scratch import private_hypothesis_home
from qgraph.verify.compare import Tolerance, compare_arrays, default_tolerance
from qgraph.specializations import compiled_ctx_len
from qgraph.verify.cache_steps import (
    CachedReference,
    CacheStepError,
    hf_positions,
    initial_state,
    next_state,
    step_feeds,
)
from qgraph.verify.kv_contract import (
    MASKS_KEY,
    MAX_POSITIONS_KEY,
    KVLayout,
    KVLayoutError,
    ReferenceLayout,
    detect_kv_layout,
    has_kv_cache,
    reference_layout,
)
from qgraph.verify.roles import describe_inputs
from qgraph.verify.runner import OrtRunner, RunError

__all__ = [
    "PositionCheck",
    "ReplayCase",
    "ReplayResult",
    "SequenceCheckResult",
    "SequenceReplayer",
    "StepReport",
    "check_sequence_equivalence",
    "kept_columns",
    "padding_mask",
    "replay",
    "replay_cases",
    "replay_sequence",
]

Padding = Literal["left", "right"]
ReferenceMode = Literal["full", "prefix"]

DEFAULT_MAX_LEN = 8
DEFAULT_EXAMPLES = 25


# --- cases ---------------------------------------------------------------------


def kept_columns(positions: np.ndarray, n: int) -> np.ndarray:
    """[batch, n] columns of a chunk whose logits a ``num_logits_to_keep`` graph returns (QEfficient's TLM rule).

    The n columns ending at each row's last valid one (the first column of
    its largest position), or the first n when fewer columns lead up to it;
    a column past the chunk reads the chunk's last (n > chunk length).
    """
    last = np.argmax(positions, axis=1)[:, None]
    lower = np.where(last < n, 0, last + 1 - n)
    return np.minimum(lower + np.arange(n)[None, :], positions.shape[1] - 1)


def padding_mask(lengths: Sequence[int] | np.ndarray, total_len: int, side: Padding = "right") -> np.ndarray:
    """A bool [batch, total_len] mask: True on each row's ``lengths[b]`` valid tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or (lengths < 0).any() or (lengths > total_len).any():
        raise ValueError(f"lengths must be a 1-D list of ints in [0, {total_len}], got {lengths.tolist()}")
    cols = np.arange(total_len)[None, :]
    if side == "left":
        return cols >= (total_len - lengths)[:, None]
    if side == "right":
        return cols < lengths[:, None]
    raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")


_hf_positions = hf_positions  # the name the tests and older callers use


@dataclasses.dataclass(frozen=True, eq=False)
class ReplayCase:
    """One sequence to replay: tokens, which of them are valid, and the split into steps.

    ``padding`` is descriptive ("left", "right", "none" or "mask" for a mask
    given as is); the mask ``valid`` is what the replay uses.
    """

    tokens: np.ndarray  # int [batch, total_len]
    valid: np.ndarray  # bool [batch, total_len]
    split: tuple[int, ...]
    padding: str = "none"

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens)
        valid = np.asarray(self.valid, dtype=bool)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 2-D integer array [batch, total_len], got {tokens.dtype} {tokens.shape}")
        if valid.shape != tokens.shape:
            raise ValueError(f"valid mask shape {valid.shape} differs from tokens shape {tokens.shape}")
        split = tuple(int(k) for k in self.split)
        if not split or any(k < 1 for k in split) or sum(split) != tokens.shape[1]:
            raise ValueError(
                f"split {list(split)} must be positive chunk lengths summing to total_len {tokens.shape[1]}"
            )
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "valid", valid)
        object.__setattr__(self, "split", split)

    @classmethod
    def from_lengths(
        cls,
        tokens: np.ndarray,
        split: Sequence[int],
        lengths: Sequence[int] | None = None,
        padding: Padding = "right",
    ) -> ReplayCase:
        tokens = np.asarray(tokens)
        if lengths is None:
            return cls(tokens, np.ones(tokens.shape, bool), tuple(split), "none")
        valid = padding_mask(lengths, tokens.shape[1], padding)
        return cls(tokens, valid, tuple(split), padding if not valid.all() else "none")

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def total_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.valid.sum(axis=1)]

    @property
    def positions(self) -> np.ndarray:
        """Each token's position in its row's sequence (cumsum(valid) - 1), -1 on padding."""
        return np.where(self.valid, np.cumsum(self.valid, axis=1) - 1, -1).astype(np.int64)

    def steps(self) -> list[tuple[int, int]]:
        """(start, stop) columns of each step."""
        bounds = np.cumsum((0, *self.split))
        return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for a in (np.ascontiguousarray(self.tokens, np.int64), np.ascontiguousarray(self.valid)):
            h.update(repr(a.shape).encode())
            h.update(a.tobytes())
        h.update(repr(self.split).encode())
        return h.digest()

    def describe(self) -> str:
        pad = "no padding" if self.valid.all() else f"{self.padding} padding, lengths {self.lengths}"
        return f"batch {self.batch}, total_len {self.total_len}, {pad}, split {list(self.split)}"

    def __repr__(self) -> str:
        return f"ReplayCase({self.describe()}, tokens={self.tokens.tolist()})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens.tolist(),
            "valid": self.valid.astype(int).tolist(),
            "lengths": self.lengths,
            "padding": self.padding,
            "split": list(self.split),
        }


# --- reports ---------------------------------------------------------------------


@dataclasses.dataclass
class PositionCheck:
    """The cached graph's logits at one (row, column) against the reference's."""

    step: int
    row: int
    column: int  # column in the tokens array
    position: int  # the token's position in its row's sequence
    passed: bool
    max_abs_error: float
    max_rel_error: float
    atol: float  # effective atol after scaling
    rtol: float
    worst_vocab_index: int | None
    reference_value: float | None
    candidate_value: float | None
    reference_token: int
    candidate_token: int

    @property
    def greedy_agrees(self) -> bool:
        return self.reference_token == self.candidate_token

    def __str__(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        greedy = "same greedy token" if self.greedy_agrees else "greedy token differs"
        return (
            f"row {self.row} column {self.column} (position {self.position}): {status} "
            f"max abs {self.max_abs_error:.3g} at vocab {self.worst_vocab_index} "
            f"(reference {_fmt(self.reference_value)}, cached {_fmt(self.candidate_value)}), "
            f"atol {self.atol:.3g} rtol {self.rtol:.3g}; {greedy} "
            f"(reference {self.reference_token}, cached {self.candidate_token})"
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["greedy_agrees"] = self.greedy_agrees
        return {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


@dataclasses.dataclass
class StepReport:
    """One run of the cached graph: columns [start, stop) of the sequence."""

    index: int
    start: int
    stop: int
    kind: str  # "prefill", "chunk" or "decode"
    fed_len: int  # seq length fed (> stop - start when a static seq dim forced padding)
    logits_at: str = ""  # "every position", "last valid position" or (concat logits=last) "last column"
    checks: list[PositionCheck] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[PositionCheck]:
        return [c for c in self.checks if not c.passed]

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=0.0)

    def columns(self) -> str:
        return f"column {self.start}" if self.stop - self.start == 1 else f"columns {self.start}:{self.stop}"

    def __str__(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        pad = f", padded to {self.fed_len}" if self.fed_len != self.stop - self.start else ""
        agree = sum(c.greedy_agrees for c in self.checks)
        head = (
            f"step {self.index} ({self.kind}, {self.columns()}{pad}): {status}; "
            f"{len(self.checks) - len(self.failures)}/{len(self.checks)} positions within tolerance, "
            f"max abs {self.max_abs_error:.3g}, greedy {agree}/{len(self.checks)}"
        )
        lines = [head]
        if self.error:
            lines.append(f"    error: {self.error}")
        lines += [f"    {c}" for c in self.checks if not c.passed or not c.greedy_agrees]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "start": self.start,
            "stop": self.stop,
            "kind": self.kind,
            "fed_len": self.fed_len,
            "logits_at": self.logits_at,
            "passed": self.passed,
            "error": self.error,
            "max_abs_error": self.max_abs_error,
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclasses.dataclass
class ReplayResult:
    """Per step, per valid position: the cached graph's logits against the reference's."""

    case: ReplayCase
    style: str
    steps: list[StepReport]
    tolerance: Tolerance | None
    reference_mode: str
    require_greedy: bool = False

    @property
    def checks(self) -> list[PositionCheck]:
        return [c for s in self.steps for c in s.checks]

    @property
    def passed(self) -> bool:
        ok = len(self.steps) == len(self.case.split) and all(s.passed for s in self.steps)
        if ok and self.require_greedy:
            ok = all(c.greedy_agrees for c in self.checks)
        return ok

    def __bool__(self) -> bool:
        return self.passed

    @property
    def first_failure(self) -> tuple[StepReport, PositionCheck | None] | None:
        """The first failing step and its first failing position (None when the step reports an error)."""
        for step in self.steps:
            if step.error is not None:
                return step, None
            for check in step.checks:
                if not check.passed or (self.require_greedy and not check.greedy_agrees):
                    return step, check
        return None

    @property
    def greedy_agreement(self) -> float:
        checks = self.checks
        return sum(c.greedy_agrees for c in checks) / len(checks) if checks else 1.0

    @property
    def max_abs_error(self) -> float:
        return max((s.max_abs_error for s in self.steps), default=0.0)

    def headline(self) -> str:
        checks = self.checks
        status = "PASSED" if self.passed else "FAILED"
        head = (
            f"sequence replay {status} ({self.style}-style cache; {self.case.describe()}): "
            f"{len(checks) - sum(not c.passed for c in checks)}/{len(checks)} positions within tolerance, "
            f"greedy agreement {sum(c.greedy_agrees for c in checks)}/{len(checks)}, "
            f"max abs {self.max_abs_error:.3g}"
        )
        first = self.first_failure
        if first is not None:
            step, check = first
            if check is None:
                head += f"\nfirst divergence: step {step.index} ({step.kind}, {step.columns()}): {step.error}"
            else:
                head += (
                    f"\nfirst divergence: step {step.index} ({step.kind}, {step.columns()}), "
                    f"row {check.row}, column {check.column}, position {check.position}"
                )
        return head

    def __str__(self) -> str:
        return "\n".join([self.headline(), *(str(s) for s in self.steps)])

    def to_dict(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "passed": self.passed,
            "style": self.style,
            "reference_mode": self.reference_mode,
            "case": self.case.to_dict(),
            "greedy_agreement": self.greedy_agreement,
            "max_abs_error": self.max_abs_error,
            "first_failure": None
            if first is None
            else {"step": first[0].index, **({} if first[1] is None else {"row": first[1].row,
                                                                            "column": first[1].column,
                                                                            "position": first[1].position})},
            "steps": [s.to_dict() for s in self.steps],
        }


# --- the replayer ---------------------------------------------------------------------


class _ReferenceFailed(BadInputError):
    """The reference could not run a case: the reference (or the case) is unusable, not the cached graph."""


def _label(source: Any, default: str) -> str:
    return str(source) if isinstance(source, str) else default


def _replayable(layout: KVLayout, ctx_len: int | None, label: str, *, fallback_ctx_len: int | None = None) -> int | None:
    """The cache length a replay of ``layout`` uses (None for concat); raises KVLayoutError when it cannot replay.

    A retained graph needs its ctx_len (static, or ``ctx_len``, or for a
    cached reference the candidate's), a concat graph a dynamic seq dim, and
    both static head counts and head dims to build the first, empty cache.
    """
    if layout.style == "retained":
        if layout.ctx_len is not None and ctx_len is not None and ctx_len != layout.ctx_len:
            raise KVLayoutError(f"ctx_len={ctx_len} given, but {label} fixes it at {layout.ctx_len}")
        resolved = next((c for c in (layout.ctx_len, ctx_len, fallback_ctx_len) if c is not None), None)
        if resolved is None:
            raise KVLayoutError(f"{label}: ctx_len is symbolic in the cache inputs and no specializations.json "
                                "names one; pass ctx_len=")
    else:
        resolved = None
        if layout.seq_len is not None:
            raise KVLayoutError(
                f"{label}: a concat-style graph with a static seq dim ({layout.seq_len}) "
                "cannot be replayed in arbitrary splits"
            )
    if layout.n_kv_heads is None or layout.head_dim is None:
        raise KVLayoutError(
            f"{label}: n_kv_heads and head_dim must be static in {layout.past[0][0]} to build the initial cache"
        )
    return resolved


class SequenceReplayer:
    """Both graphs loaded once in onnxruntime; :meth:`run` replays one case.

    ``ctx_len``: the retained cache length when the graph leaves it
    symbolic (must match it when static).
    """

    def __init__(
        self,
        cached: qio.ModelSource,
        reference: qio.ModelSource,
        *,
        ctx_len: int | None = None,
        threads: int = 1,
        cached_label: str | None = None,
        reference_label: str | None = None,
        logits_to_keep: int | None = None,
    ) -> None:
        self.cached_label = cached_label or _label(cached, "the cached graph")
        self.reference_label = reference_label or _label(reference, "the reference")
        cached_model = qio.load(cached)
        reference_model = qio.load(reference)
        self.layout: KVLayout = detect_kv_layout(cached_model, label=self.cached_label)
        lay = self.layout
        # a symbolic ctx_len: the length the graph's specializations compile
        self.ctx_len = _replayable(lay, ctx_len, self.cached_label,
                                   fallback_ctx_len=compiled_ctx_len(cached_model, cached))
        #: The reference's own KV layout when it has a cache (a conversion between cache forms), else None.
        self.reference_cache: KVLayout | None = None
        if has_kv_cache(reference_model):
            ref_cache = detect_kv_layout(reference_model, label=self.reference_label)
            ref_ctx = _replayable(ref_cache, None, self.reference_label, fallback_ctx_len=ctx_len or self.ctx_len)
            self.reference_cache = ref_cache
            self._reference_ctx_len = ref_ctx
            self.reference = ReferenceLayout(
                ids_dtype=ref_cache.ids_dtype,
                mask_dtype=ref_cache.mask_dtype if ref_cache.mask_dtype is not None else np.dtype(np.int64),
                positions_dtype=ref_cache.positions_dtype,
                vocab=ref_cache.vocab,
                seq_len=None,
            )
        else:
            self.reference = reference_layout(reference_model, label=self.reference_label)
        if logits_to_keep is not None and not lay.keeps_logits:
            raise KVLayoutError(f"logits_to_keep={logits_to_keep} given, but {self.cached_label} has no "
                                "'num_logits_to_keep' input")
        if logits_to_keep is not None and logits_to_keep < 1:
            raise KVLayoutError(f"logits_to_keep must be at least 1, got {logits_to_keep}")
        self.logits_to_keep = (logits_to_keep or 1) if lay.keeps_logits else None
        self.vocab = _vocab_of(lay, self.reference, reference_model)
        self.compute_context_len: int | None = None  # comp_ctx_lengths fed (None: ctx_len, the whole cache)
        self._ref_model = reference_model
        self.ref_runner = OrtRunner(reference_model, threads=threads, label=self.reference_label)
        try:
            self.cached_runner = OrtRunner(cached_model, threads=threads, label=self.cached_label)
        except RunError:
            self.ref_runner.close()
            raise
        self._cached_reference = None
        if self.reference_cache is not None:
            self._cached_reference = CachedReference(
                self.reference_cache, self.ref_runner, self._reference_ctx_len, self.reference_label
            )

    # -- public --------------------------------------------------------------------

    @property
    def max_chunk(self) -> int | None:
        """The longest chunk one step takes: the static seq dim, if any."""
        return self.layout.seq_len

    def run(
        self,
        case: ReplayCase,
        *,
        tolerance: Tolerance | None = None,
        reference_mode: ReferenceMode = "full",
        require_greedy: bool = False,
    ) -> ReplayResult:
        """Replay ``case``; raises BadInputError when the case does not fit the graphs or the reference fails."""
        self._validate(case)
        if reference_mode not in ("full", "prefix"):
            raise ValueError(f"reference_mode must be 'full' or 'prefix', got {reference_mode!r}")
        result = ReplayResult(case, self.layout.style, [], tolerance, reference_mode, require_greedy)
        full_ref = self._reference(case, case.total_len) if reference_mode == "full" else None
        state = self._initial_state(case.batch)
        past_len = 0
        for index, (start, stop) in enumerate(case.steps()):
            k = stop - start
            kind = "prefill" if index == 0 else ("decode" if k == 1 else "chunk")
            feeds, fed_len = self._feeds(case, start, stop, state)
            step = StepReport(index, start, stop, kind, fed_len)
            result.steps.append(step)
            try:
                out = self.cached_runner.run(feeds)
            except RunError as exc:
                step.error = str(exc)
                break
            ref_logits = full_ref if full_ref is not None else self._reference(case, stop)
            # In prefix mode the reference covers columns [0, stop); in full mode [0, total).
            self._compare_step(step, case, out["logits"], ref_logits, fed_len, tolerance)
            if step.error is not None:
                break
            try:
                state = self._next_state(out, state, past_len, fed_len)
            except ValueError as exc:
                step.error = str(exc)
                break
            past_len += fed_len
        return result

    def reference_logits(self, tokens: np.ndarray) -> np.ndarray:
        """The no-cache graph's logits [n, vocab] for one sequence alone (no padding)."""
        ref = self.reference
        tokens = np.asarray(tokens).reshape(1, -1)
        feeds = {"input_ids": tokens.astype(ref.ids_dtype), "attention_mask": np.ones(tokens.shape, ref.mask_dtype)}
        if ref.positions_dtype is not None:
            feeds["position_ids"] = np.arange(tokens.shape[1])[None].astype(ref.positions_dtype)
        try:
            return self.ref_runner.run(feeds)["logits"][0]
        except RunError as exc:
            raise _ReferenceFailed(str(exc)) from None

    def close(self) -> None:
        self.ref_runner.close()
        self.cached_runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------

    def _validate(self, case: ReplayCase) -> None:
        lay = self.layout
        if lay.batch is not None and case.batch != lay.batch:
            raise BadInputError(f"{self.cached_label} has a static batch of {lay.batch}; the case has {case.batch} rows")
        if (case.tokens < 0).any() or (self.vocab is not None and (case.tokens >= self.vocab).any()):
            raise BadInputError(f"token ids must lie in [0, {self.vocab})")
        if lay.seq_len is not None and max(case.split) > lay.seq_len:
            raise BadInputError(
                f"{self.cached_label} takes at most {lay.seq_len} tokens a step (static seq dim); "
                f"split {list(case.split)} has a longer chunk"
            )
        if self.compute_context_len is not None and int(case.positions.max(initial=-1)) >= self.compute_context_len:
            raise BadInputError(f"a row has {max(case.lengths)} valid tokens, more than the compute-context length "
                                f"{self.compute_context_len} lets attention read")
        if lay.masks_all_ones and not case.valid.all():
            raise BadInputError(f"{self.cached_label} computes only unpadded rows (metadata {MASKS_KEY}=all-ones); "
                                f"the case has {case.padding} padding")
        if lay.max_positions is not None and case.total_len > lay.max_positions:
            raise BadInputError(f"{self.cached_label} takes at most {lay.max_positions} positions a row "
                                f"(metadata {MAX_POSITIONS_KEY}); the case has {case.total_len}")
        if self.ctx_len is not None and int(case.positions.max(initial=-1)) >= self.ctx_len:
            raise BadInputError(
                f"a row has {max(case.lengths)} valid tokens, more than the cache holds (ctx_len {self.ctx_len})"
            )

    def serving_feeds(self, batch: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``batch_index`` (row b owns cache row ``rows[b]``, default b), ``comp_ctx_lengths`` (of length
        ``compute_context_len``, default ctx_len) and ``num_logits_to_keep`` where the graph has them."""
        feeds: dict[str, np.ndarray] = {}
        if self.layout.continuous_batching:
            rows = np.arange(batch) if rows is None else np.asarray(rows)
            feeds["batch_index"] = rows.reshape(-1, 1).astype(np.int64)
        if self.layout.compute_context:
            feeds["comp_ctx_lengths"] = np.zeros(self.compute_context_len or self.ctx_len, np.int64)
        if self.logits_to_keep is not None:  # a speculative target's: only its length is read
            feeds["num_logits_to_keep"] = np.arange(self.logits_to_keep, dtype=np.int64).reshape(-1, 1)
        return feeds

    def _initial_state(self, batch: int) -> dict[str, np.ndarray]:
        return initial_state(self.layout, batch, self.ctx_len)

    def _feeds(
        self, case: ReplayCase, start: int, stop: int, state: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int]:
        feeds, fed_len = step_feeds(self.layout, case, start, stop, state)
        if self.layout.style == "retained":
            feeds.update(self.serving_feeds(case.batch))
        return feeds, fed_len

    def _reference(self, case: ReplayCase, stop: int) -> np.ndarray:
        if self._cached_reference is not None:
            # Columns [0, stop) replayed through the reference's own cache, in the case's split.
            try:
                return self._cached_reference.logits(case, case.split, stop)
            except (RunError, CacheStepError) as exc:
                raise _ReferenceFailed(str(exc)) from None
        ref = self.reference
        mask = case.valid[:, :stop]
        feeds = {
            "input_ids": case.tokens[:, :stop].astype(ref.ids_dtype),
            "attention_mask": mask.astype(ref.mask_dtype),
        }
        if ref.positions_dtype is not None:
            feeds["position_ids"] = _hf_positions(mask, stop).astype(ref.positions_dtype)
        try:
            logits = self.ref_runner.run(feeds)["logits"]
        except RunError as exc:
            raise _ReferenceFailed(str(exc)) from None
        if logits.ndim != 3 or logits.shape[:2] != (case.batch, stop):
            raise _ReferenceFailed(
                f"{self.reference_label}: logits have shape {logits.shape}; expected [{case.batch}, {stop}, vocab]"
            )
        if ref.positions_dtype is None:
            logits = self._unpadded_rows(case, stop, logits)
        return logits

    def _unpadded_rows(self, case: ReplayCase, stop: int, logits: np.ndarray) -> np.ndarray:
        """A row with padding before a valid token gets the reference's logits for its valid tokens alone.

        A reference without a position_ids input computes positions itself;
        a plain export counts them from column 0, so padding in front of a
        token shifts its position. The cached graph's meaning is docs/design.md's
        (positions from position_ids, cumsum(mask) - 1): the sequence the row
        holds, unpadded. For a reference that computes cumsum(mask) - 1
        itself both are the same, so the rule holds for every reference.
        """
        ref = self.reference
        out = None
        for row in range(case.batch):
            columns = np.flatnonzero(case.valid[row, :stop])
            if columns.size == 0 or columns[-1] == columns.size - 1:
                continue  # no valid token, or all of them first: no shift
            feeds = {
                "input_ids": case.tokens[row, columns][None].astype(ref.ids_dtype),
                "attention_mask": np.ones((1, columns.size), ref.mask_dtype),
            }
            try:
                alone = self.ref_runner.run(feeds)["logits"]
            except RunError as exc:
                raise _ReferenceFailed(str(exc)) from None
            out = logits.copy() if out is None else out
            out[row, columns] = alone[0]
        return logits if out is None else out

    def _compare_step(
        self,
        step: StepReport,
        case: ReplayCase,
        logits: np.ndarray,
        ref_logits: np.ndarray,
        fed_len: int,
        tolerance: Tolerance | None,
    ) -> None:
        k = step.stop - step.start
        if logits.ndim != 3 or logits.shape[0] != case.batch or logits.shape[2] != ref_logits.shape[2]:
            step.error = (
                f"logits have shape {logits.shape}; expected [{case.batch}, {fed_len} or 1, {ref_logits.shape[2]}]"
            )
            return
        n = self.logits_to_keep
        if n is not None:
            if logits.shape[1] != n:
                step.error = f"logits have {logits.shape[1]} positions; expected num_logits_to_keep's length {n}"
                return
            step.logits_at = f"last {n} valid position(s)"
            fed = case.positions[:, step.start : step.stop]
            fed = np.pad(fed, ((0, 0), (0, fed_len - k)), constant_values=-1)
            columns = kept_columns(fed, n)
            wanted = [(b, int(j), out) for b in range(case.batch) for out, j in enumerate(columns[b])
                      if j < k and case.valid[b, step.start + j]]
        elif logits.shape[1] == fed_len:
            step.logits_at = "every position"
            wanted = [(b, j, j) for b in range(case.batch) for j in range(k) if case.valid[b, step.start + j]]
        elif logits.shape[1] == 1 and self.layout.last_column_logits:
            # The concat form's last-only logits are the chunk's last column (rows are left-padded):
            # compared where that column is a valid token, the row's last of the chunk.
            step.logits_at = "last column"
            wanted = [(b, k - 1, 0) for b in range(case.batch) if case.valid[b, step.stop - 1]]
        elif logits.shape[1] == 1:
            step.logits_at = "last valid position"
            wanted = []
            for b in range(case.batch):
                cols = np.flatnonzero(case.valid[b, step.start : step.stop])
                if cols.size:
                    wanted.append((b, int(cols[-1]), 0))
        else:
            step.error = f"logits have {logits.shape[1]} positions; expected {fed_len} (every position) or 1 (last)"
            return
        tol = tolerance or _tolerance_for(ref_logits.dtype, logits.dtype)
        positions = case.positions
        ref_dtype = ref_logits.dtype
        for b, j, out_col in wanted:
            column = step.start + j
            ref_vec = ref_logits[b, column]
            cand_vec = logits[b, out_col].astype(ref_dtype)
            rep = compare_arrays(f"logits[{b}, {column}]", ref_vec, cand_vec, tol)
            step.checks.append(
                PositionCheck(
                    step=step.index,
                    row=b,
                    column=column,
                    position=int(positions[b, column]),
                    passed=rep.passed,
                    max_abs_error=rep.max_abs_error,
                    max_rel_error=rep.max_rel_error,
                    atol=rep.atol,
                    rtol=tol.rtol,
                    worst_vocab_index=None if rep.max_error_index is None else int(rep.max_error_index[0]),
                    reference_value=rep.reference_value,
                    candidate_value=rep.candidate_value,
                    reference_token=int(np.argmax(ref_vec)),
                    candidate_token=int(np.argmax(logits[b, out_col])),
                )
            )

    def _next_state(
        self, out: dict[str, np.ndarray], state: dict[str, np.ndarray], past_len: int, fed_len: int
    ) -> dict[str, np.ndarray]:
        return next_state(self.layout, out, state, past_len, fed_len)


def _tolerance_for(*dtypes: np.dtype) -> Tolerance:
    """The looser of the dtypes' default tolerances (an fp16 cache against an fp32 reference)."""
    return max((default_tolerance(d) for d in dtypes), key=lambda t: (t.atol, t.rtol))


def _vocab_of(layout: KVLayout, ref: ReferenceLayout, reference_model: ir.Model) -> int | None:
    """The bound on token ids: the smallest vocab the logits or embedding tables declare."""
    known = [v for v in (layout.vocab, ref.vocab) if v is not None]
    # The embedding table's row count, as the input strategies read it.
    for spec in describe_inputs(reference_model):
        if spec.name == "input_ids" and spec.vocab_size and "fallback" not in spec.vocab_source:
            known.append(int(spec.vocab_size))
    return min(known) if known else None


def replay(
    cached: qio.ModelSource,
    reference: qio.ModelSource,
    tokens: np.ndarray,
    split: Sequence[int],
    *,
    valid: np.ndarray | None = None,
    lengths: Sequence[int] | None = None,
    padding: Padding = "right",
    ctx_len: int | None = None,
    tolerance: Tolerance | None = None,
    reference_mode: ReferenceMode = "full",
    require_greedy: bool = False,
    threads: int = 1,
) -> ReplayResult:
    """Replay ``tokens`` [batch, total_len] through ``cached`` in ``split`` and compare with ``reference``.

    Which tokens are valid: ``valid`` (a bool mask) or ``lengths`` per row
    with ``padding`` "left"/"right"; neither means all valid.
    """
    if valid is not None and lengths is not None:
        raise ValueError("give valid or lengths, not both")
    if valid is not None:
        case = ReplayCase(np.asarray(tokens), np.asarray(valid, bool), tuple(split), "mask")
    else:
        case = ReplayCase.from_lengths(tokens, split, lengths, padding)
    with SequenceReplayer(cached, reference, ctx_len=ctx_len, threads=threads) as replayer:
        try:
            return replayer.run(case, tolerance=tolerance, reference_mode=reference_mode, require_greedy=require_greedy)
        except _ReferenceFailed as exc:
            raise BadInputError(f"the reference cannot run the case: {exc}") from None


#: The same function under a name that does not clash with
#: ``qgraph.verify.replay`` (which re-runs a saved failing example).
replay_sequence = replay


# --- hypothesis ---------------------------------------------------------------------------

_SEED = st.integers(0, 2**32 - 1)


@st.composite
def _tokens(draw: st.DrawFn, shape: tuple[int, int], vocab: int) -> np.ndarray:
    """Uniform ids from a drawn seed, with hypothesis-chosen ids written over them.

    Dense noise rather than per-element draws: hypothesis' element
    distribution favours repeats and zeros, and identical tokens can hide a
    cache slot written one position late. Explicit ids shrink away.
    """
    noise = np.random.default_rng(draw(_SEED)).integers(0, vocab, size=shape)
    chosen = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, vocab - 1), fill=st.just(-1)))
    return np.where(chosen < 0, noise, chosen).astype(np.int64)


@st.composite
def replay_cases(
    draw: st.DrawFn,
    vocab: int,
    max_len: int = DEFAULT_MAX_LEN,
    max_batch: int = 3,
    *,
    min_len: int = 1,
    padding: Literal["left", "right", "both", "none"] = "both",
    max_chunk: int | None = None,
    batch: int | None = None,
) -> ReplayCase:
    """Cases to replay: tokens below ``vocab``, batch, per-row padding, and a split.

    batch in [1, max_batch] (or exactly ``batch``); total_len in [min_len,
    max_len]; one padding side per case ("both" draws it) with 0..total-1
    padding tokens per row, so every row keeps a valid token; the split is a
    first (prefill) chunk and then further chunks and single-token decode
    steps summing to total_len, each at most ``max_chunk`` long. Shrinks
    towards one row, short sequences, no padding, right padding and
    single-token steps.
    """
    if vocab < 1 or max_len < min_len or min_len < 1 or max_batch < 1:
        raise ValueError("need vocab >= 1, 1 <= min_len <= max_len, max_batch >= 1")
    rows = batch if batch is not None else draw(st.integers(1, max_batch))
    total = draw(st.integers(min_len, max_len))
    side: str = draw(st.sampled_from(("right", "left"))) if padding == "both" else padding
    if side == "none" or total == 1:
        pads = np.zeros(rows, np.int64)
    else:
        pads = draw(hnp.arrays(np.int64, (rows,), elements=st.integers(0, total - 1)))
    valid = padding_mask(total - pads, total, "left" if side == "left" else "right")
    tokens = draw(_tokens((rows, total), vocab))
    limit = max_chunk or total
    split: list[int] = []
    remaining = total
    while remaining:
        k = draw(st.integers(1, min(remaining, limit)), label="chunk")
        split.append(k)
        remaining -= k
    return ReplayCase(tokens, valid, tuple(split), side if not valid.all() else "none")


# --- the check ---------------------------------------------------------------------------


@dataclasses.dataclass
class SequenceCheckResult:
    """The verdict of :func:`check_sequence_equivalence`; on failure, the shrunk case and its report."""

    equivalent: bool
    examples: int
    seed: int | None
    layout: KVLayout
    case: ReplayCase | None = None
    result: ReplayResult | None = None
    shrink_runs: int = 0
    seconds: float = 0.0
    cached_label: str = "the cached graph"
    reference_label: str = "the reference"

    def __bool__(self) -> bool:
        return self.equivalent

    def headline(self) -> str:
        if self.equivalent:
            return (
                f"SEQUENCE-EQUIVALENT: {self.cached_label} ({self.layout.describe()}) matches "
                f"{self.reference_label} on {self.examples} replayed sequences (seed {self.seed})"
            )
        return f"NOT SEQUENCE-EQUIVALENT: {self.cached_label} ({self.layout.describe()}) differs from {self.reference_label}"

    def __str__(self) -> str:
        if self.equivalent or self.case is None or self.result is None:
            return self.headline()
        return "\n".join(
            [
                self.headline(),
                (
                    f"failing case (example {self.examples}, seed {self.seed}, shrunk in {self.shrink_runs} runs): "
                    f"{self.case.describe()}"
                ),
                f"tokens {self.case.tokens.tolist()}",
                str(self.result),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "equivalent": self.equivalent,
            "examples": self.examples,
            "seed": self.seed,
            "style": self.layout.style,
            "shrink_runs": self.shrink_runs,
            "seconds": round(self.seconds, 3),
            "case": None if self.case is None else self.case.to_dict(),
            "result": None if self.result is None else self.result.to_dict(),
        }


class _Tracker:
    """hypothesis' condition: replays a case and remembers its verdict (so the final replay agrees)."""

    def __init__(self, replayer: SequenceReplayer, kwargs: dict[str, Any], max_shrink_runs: int) -> None:
        self.replayer, self.kwargs, self.max_shrink_runs = replayer, kwargs, max_shrink_runs
        self.cache: dict[bytes, ReplayResult] = {}
        self.runs = 0
        self.runs_at_failure: int | None = None
        self.reference_error: str | None = None

    @property
    def shrink_runs(self) -> int:
        return 0 if self.runs_at_failure is None else self.runs - self.runs_at_failure

    def __call__(self, case: ReplayCase) -> bool:
        key = case.digest()
        if key not in self.cache:
            if self.runs_at_failure is not None and self.shrink_runs >= self.max_shrink_runs:
                return False  # shrink budget spent
            try:
                self.cache[key] = self.replayer.run(case, **self.kwargs)
            except _ReferenceFailed as exc:
                self.reference_error = str(exc)
                raise
            self.runs += 1
            if self.runs_at_failure is None and not self.cache[key].passed:
                self.runs_at_failure = self.runs
        return not self.cache[key].passed


def check_sequence_equivalence(
    cached: qio.ModelSource,
    reference: qio.ModelSource,
    *,
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = 0,
    max_len: int | None = None,
    max_batch: int = 3,
    padding: Literal["left", "right", "both", "none"] = "both",
    ctx_len: int | None = None,
    compute_context_len: int | None = None,
    vocab: int | None = None,
    tolerance: Tolerance | None = None,
    require_greedy: bool = False,
    reference_mode: ReferenceMode = "full",
    max_shrink_runs: int = 200,
    threads: int = 1,
    cached_label: str | None = None,
    reference_label: str | None = None,
    logits_to_keep: int | None = None,
) -> SequenceCheckResult:
    """Replay ``examples`` drawn cases through ``cached``; on failure return the shrunk case and its report.

    The two onnxruntime sessions are created once for the whole check.
    ``max_len`` defaults to 8 tokens, and for the retained style to at most
    ``ctx_len - 1`` (one slot left for the padding writes); a static batch
    or seq dim of the cached graph fixes the batch and caps the chunk length.
    ``vocab`` bounds token ids when neither graph declares it.
    ``compute_context_len``: the length of ``comp_ctx_lengths`` fed to a
    graph that has that input (default: ctx_len, the whole cache).

    Raises:
        BadInputError (KVLayoutError): a graph follows neither contract, or
            the reference fails on a drawn case.
    """
    started = time.perf_counter()
    if seed is None:
        seed = random.randrange(2**32)
    replayer = SequenceReplayer(
        cached, reference, ctx_len=ctx_len, threads=threads, cached_label=cached_label, reference_label=reference_label,
        logits_to_keep=logits_to_keep,
    )
    replayer.compute_context_len = compute_context_len
    try:
        bound = vocab if vocab is not None else replayer.vocab
        if bound is None:
            raise KVLayoutError("the vocab size is symbolic in both graphs' logits and not found in an embedding; pass vocab=")
        lay = replayer.layout
        if max_len is None:
            max_len = DEFAULT_MAX_LEN if replayer.ctx_len is None else min(DEFAULT_MAX_LEN, replayer.ctx_len - 1)
        if lay.max_positions is not None:
            max_len = min(max_len, lay.max_positions)
        if max_len < 1:
            raise KVLayoutError(f"ctx_len {replayer.ctx_len} leaves no room for a sequence")
        if lay.masks_all_ones:
            padding = "none"  # the graph's declared domain (metadata MASKS_KEY): unpadded rows only
        elif lay.last_column_logits and padding == "both":
            padding = "left"  # its contract: the chunk's last column is each row's last token
        strategy = replay_cases(
            bound, max_len, max_batch, padding=padding, max_chunk=lay.seq_len, batch=lay.batch
        )
        tracker = _Tracker(
            replayer,
            {"tolerance": tolerance, "reference_mode": reference_mode, "require_greedy": require_greedy},
            max_shrink_runs,
        )
        settings = hypothesis.settings(
            max_examples=examples,
            database=None,
            deadline=None,
            phases=(Phase.generate, Phase.shrink),
            verbosity=Verbosity.quiet,
            print_blob=False,
            suppress_health_check=list(HealthCheck),
        )
        failing: ReplayCase | None
        try:
            with private_hypothesis_home():
                failing = hypothesis.find(strategy, tracker, settings=settings, random=random.Random(seed))
        except (NoSuchExample, Unsatisfiable):
            failing = None
        except _ReferenceFailed as exc:
            raise BadInputError(f"{replayer.reference_label} fails on a drawn case: {exc}") from None
    finally:
        replayer.close()
    out = SequenceCheckResult(
        equivalent=failing is None,
        examples=tracker.runs if failing is None else tracker.runs_at_failure or tracker.runs,
        seed=seed,
        layout=replayer.layout,
        shrink_runs=tracker.shrink_runs,
        cached_label=replayer.cached_label,
        reference_label=replayer.reference_label,
    )
    if failing is not None:
        out.case = failing
        out.result = tracker.cache[failing.digest()]
    out.seconds = time.perf_counter() - started
    return out

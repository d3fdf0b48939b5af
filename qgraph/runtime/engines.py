"""One forward step of a language-model graph, for each graph form qgraph produces.

* :class:`NoCacheEngine` -- the plain export (``input_ids``, ``attention_mask``
  -> ``logits``): every step recomputes the whole prefix. The baseline the
  cached graphs are measured against.
* :class:`ConcatEngine` -- concat-style KV cache (docs/design.md; optimum's
  names). ``present.*`` comes back as onnxruntime-owned OrtValues that are
  bound as the next step's ``past_key_values.*`` without a trip through
  numpy. A graph whose logits are the chunk's last column only (``kv-cache``
  ``logits=last``) gets its prompt left-aligned (:func:`left_aligned`).
* :class:`RetainedEngine` -- retained-state KV cache with a fixed ``ctx_len``.
  The cache lives in OrtValues allocated once per generation. When every
  reader of a ``past_*`` input is the scatter that writes the new K/V (or a
  Shape), the ``*_RetainedState`` output is bound to the same OrtValue as the
  input ("alias"): onnxruntime's ScatterND skips its input copy when input
  and output share a buffer, so a step touches only the new slots. Otherwise
  two sets of buffers are swapped each step ("swap"), which costs one copy of
  the cache per step but never reads a buffer being written.

All engines share the bookkeeping of positions: a row's position is the
number of valid tokens it has seen, padding is -1 in the retained contract
and 1 in Hugging Face's rule (concat and no-cache), and :meth:`Engine.prefill`
returns, for every row, the logits at its last valid prompt token, whatever
the padding side and however the prompt was split into chunks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qgraph import io as qio
from qgraph.errors import BadInputError, QGraphError
from qgraph.runtime.session import DEFAULT_THREADS, open_session
from qgraph.specializations import compiled_ctx_len
from qgraph.verify.kv_contract import (
    KVLayout,
    KVLayoutError,
    detect_kv_layout,
    reference_layout,
)

__all__ = ["ConcatEngine", "Engine", "NoCacheEngine", "RetainedEngine", "RunFailure", "make_engine"]

CacheBinding = Literal["auto", "alias", "swap"]
# Readers of a retained-state cache input that never observe it after the scatter wrote it.
_ALIAS_SAFE_READERS = {("", "ScatterND"), ("ai.onnx", "ScatterND"), ("", "Shape"), ("ai.onnx", "Shape")}
_SCATTER_CUSTOM_OPS = {"CtxScatter", "CtxScatterFunc", "CtxScatterCB"}
# What onnxruntime raises from a run: its pybind exception classes, and RuntimeError from run_with_iobinding.
_ORT_ERRORS = (RuntimeError, *(
    cls for cls in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(cls, type) and issubclass(cls, Exception)
))


class RunFailure(QGraphError):
    """onnxruntime failed while running a step of a graph it had loaded (exit code 1)."""


class Engine:
    """Runs steps of one graph and remembers how many valid tokens each row has seen."""

    kind = "engine"

    def __init__(self, session: ort.InferenceSession, *, label: str, fixed_batch: int | None = None,
                 max_tokens: int | None = None) -> None:
        self.session = session
        self.label = label
        self.fixed_batch = fixed_batch
        self.max_tokens = max_tokens  #: most tokens (prompt + fed generated) a row may hold; None = unbounded
        self.runs = 0
        self._seen = np.zeros(0, np.int64)

    # -- the step contract each engine implements -----------------------------------------

    def start(self, batch: int) -> None:
        """Forget everything: a new generation of ``batch`` rows."""
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise BadInputError(f"{self.label}: the graph's batch is fixed at {self.fixed_batch}, got {batch} row(s)")
        self._seen = np.zeros(batch, np.int64)
        self.runs = 0

    def _run(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Feed columns ``tokens`` [B, w] (``valid`` marks real tokens); logits [B, w, V] or [B, 1, V]."""
        raise NotImplementedError

    @property
    def default_chunk(self) -> int | None:
        """Prefill chunk length the graph needs (fixed seq dim); None = whole prompt at once."""
        return None

    # -- shared ----------------------------------------------------------------------------

    def _step(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        try:
            return self._run(tokens, valid)
        except _ORT_ERRORS as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RunFailure(f"{self.label}: onnxruntime failed on a step of {tokens.shape[1]} column(s) "
                             f"after {self.runs} run(s): {first}") from error

    @property
    def seen(self) -> np.ndarray:
        """Valid tokens each row has fed so far (the next one's position)."""
        return self._seen

    def _positions(self, valid: np.ndarray) -> np.ndarray:
        """Positions of the columns ``valid`` [B, w] (-1 on padding); advances each row's count."""
        counts = np.cumsum(valid, axis=1, dtype=np.int64)
        positions = np.where(valid, self._seen[:, None] + counts - 1, -1).astype(np.int64)
        self._seen = self._seen + counts[:, -1]
        return positions

    def prefill(self, tokens: np.ndarray, valid: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Run the prompt ``tokens`` [B, L] in chunks; logits [B, V] at each row's last valid token."""
        tokens = np.asarray(tokens, np.int64)
        valid = np.asarray(valid, bool)
        if not valid.any(axis=1).all():
            empty = [int(b) for b in np.flatnonzero(~valid.any(axis=1))]
            raise BadInputError(f"prompt row(s) {empty} have no tokens")
        length = tokens.shape[1]
        chunk = chunk or self.default_chunk or length
        last = length - 1 - np.argmax(valid[:, ::-1], axis=1)  # last valid column of each row
        out: np.ndarray | None = None
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            logits = self._step(tokens[:, start:stop], valid[:, start:stop])
            if out is None:
                out = np.full((tokens.shape[0], logits.shape[-1]), np.nan, np.float32)
            for b in np.flatnonzero((last >= start) & (last < stop)):
                out[b] = logits[b, 0] if logits.shape[1] == 1 else logits[b, last[b] - start]
        assert out is not None
        return out

    def decode(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Feed one token per row (``active`` False: padding, the row is done); logits [B, V]."""
        logits = self._step(np.asarray(tokens, np.int64)[:, None], np.asarray(active, bool)[:, None])
        return logits[:, 0]

    def describe(self) -> str:
        return self.kind


class NoCacheEngine(Engine):
    """``input_ids``, ``attention_mask`` [, ``position_ids``] -> ``logits`` [B, S, V]: recompute the prefix."""

    kind = "no-cache"

    def __init__(self, session: ort.InferenceSession, *, label: str, has_position_ids: bool,
                 max_tokens: int | None = None) -> None:
        super().__init__(session, label=label, max_tokens=max_tokens)
        self.has_position_ids = has_position_ids
        self._tokens = np.zeros((0, 0), np.int64)
        self._valid = np.zeros((0, 0), bool)

    def start(self, batch: int) -> None:
        super().start(batch)
        self._tokens = np.zeros((batch, 0), np.int64)
        self._valid = np.zeros((batch, 0), bool)

    def _run(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        self._positions(valid)
        self._tokens = np.concatenate([self._tokens, tokens], axis=1)
        self._valid = np.concatenate([self._valid, valid], axis=1)
        feeds = {"input_ids": self._tokens, "attention_mask": self._valid.astype(np.int64)}
        if self.has_position_ids:
            feeds["position_ids"] = _hf_positions(self._valid)
        (logits,) = self.session.run(["logits"], feeds)
        self.runs += 1
        return logits[:, -tokens.shape[1]:]


class ConcatEngine(Engine):
    """Concat-style KV cache: ``present.*`` OrtValues are fed back as ``past_key_values.*``."""

    kind = "concat KV cache"

    def __init__(self, session: ort.InferenceSession, layout: KVLayout, *, label: str, n_kv_heads: int,
                 head_dim: int, max_tokens: int | None = None) -> None:
        super().__init__(session, label=label, max_tokens=max_tokens)
        self.layout = layout
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self._mask = np.zeros((0, 0), np.int64)
        self._past: dict[str, ort.OrtValue] = {}
        self._binding = session.io_binding()

    def start(self, batch: int) -> None:
        super().start(batch)
        self._mask = np.zeros((batch, 0), np.int64)
        empty = np.zeros((batch, self.n_kv_heads, 0, self.head_dim), self.layout.cache_dtype)
        self._past = {name: ort.OrtValue.ortvalue_from_numpy(empty) for pair in self.layout.past for name in pair}

    def prefill(self, tokens: np.ndarray, valid: np.ndarray, chunk: int | None = None) -> np.ndarray:
        if self.layout.last_column_logits:  # logits of the chunk's last column only: it must be every row's last
            tokens, valid = left_aligned(tokens, valid)
        return super().prefill(tokens, valid, chunk)

    def _run(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        self._positions(valid)
        self._mask = np.concatenate([self._mask, valid.astype(self._mask.dtype)], axis=1)
        b = self._binding
        b.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, self.layout.ids_dtype))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(self._mask, self.layout.mask_dtype))
        if self.layout.has_position_ids:
            positions = _hf_positions(self._mask)[:, -tokens.shape[1]:]
            b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, self.layout.positions_dtype))
        for name, value in self._past.items():
            b.bind_ortvalue_input(name, value)
        b.bind_output("logits", "cpu")
        for pair in self.layout.present:
            for name in pair:
                b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        self.runs += 1
        outputs = b.get_outputs()
        names = [name for pair in self.layout.present for name in pair]
        past_names = [name for pair in self.layout.past for name in pair]
        self._past = dict(zip(past_names, outputs[1:1 + len(names)], strict=True))
        return outputs[0].numpy()

    def describe(self) -> str:
        return f"{self.kind} ({self.layout.n_layers} layers)"


class RetainedEngine(Engine):
    """Retained-state KV cache of fixed ``ctx_len``, kept in OrtValues for the whole generation."""

    kind = "retained KV cache"

    def __init__(self, session: ort.InferenceSession, layout: KVLayout, *, label: str, ctx_len: int,
                 n_kv_heads: int, head_dim: int, prefill_len: int | None, binding: Literal["alias", "swap"],
                 compute_context_lengths: Sequence[int] = ()) -> None:
        # Padding tokens leave the last slot as it is, and a valid token there would meet such a
        # write in the same chunk, so a row holds at most ctx_len - 1 tokens.
        super().__init__(session, label=label, fixed_batch=layout.batch, max_tokens=ctx_len - 1)
        self.layout = layout
        self.ctx_len = ctx_len
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.fixed_len = layout.seq_len  # every run is padded to this width when the graph fixes it
        self.prefill_len = prefill_len
        self.binding_mode = binding
        # comp_ctx_lengths: each run takes the shortest compiled length that holds its rows' positions
        self.compute_context_lengths = sorted(set(compute_context_lengths) | {ctx_len})
        self._binding = session.io_binding()
        self._cache: dict[str, ort.OrtValue] = {}
        self._spare: dict[str, ort.OrtValue] = {}
        self._rows: np.ndarray | None = None  # cache rows of the next run (continuous batching)
        self.keep = 1  #: length of num_logits_to_keep fed to a speculative target (logits at the last n tokens)

    @property
    def default_chunk(self) -> int | None:
        return self.fixed_len or self.prefill_len

    def start(self, batch: int) -> None:
        super().start(batch)
        self._rows = None
        shape = (batch, self.n_kv_heads, self.ctx_len, self.head_dim)
        names = [name for pair in self.layout.past for name in pair]
        self._cache = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.layout.cache_dtype)) for n in names}
        self._spare = {}
        if self.binding_mode == "swap":
            self._spare = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.layout.cache_dtype)) for n in names}
        self._binding = b = self.session.io_binding()
        b.bind_output("logits", "cpu")  # bound first: get_outputs()[0]
        if self.binding_mode == "alias":
            for (past_k, past_v), (ret_k, ret_v) in zip(self.layout.past, self.layout.present, strict=True):
                for past, ret in ((past_k, ret_k), (past_v, ret_v)):
                    b.bind_ortvalue_input(past, self._cache[past])
                    b.bind_ortvalue_output(ret, self._cache[past])

    # -- continuous batching: one cache row per sequence, prefilled alone, decoded together ---------

    def start_slots(self, slots: int) -> None:
        """A cache of ``slots`` rows, all free (needs a graph with a ``batch_index`` input)."""
        if not self.layout.continuous_batching:
            raise BadInputError(f"{self.label} has no batch_index input: it is not a continuous-batching graph")
        self.start(slots)

    def prefill_slot(self, slot: int, tokens: Sequence[int], chunk: int | None = None) -> np.ndarray:
        """A new sequence in cache row ``slot`` (whatever it held is forgotten); logits [V] at its last token."""
        saved = self._seen
        self._rows, self._seen = np.array([slot]), np.zeros(1, np.int64)
        try:
            logits = self.prefill(np.asarray(tokens, np.int64)[None], np.ones((1, len(tokens)), bool), chunk)
        finally:
            saved[slot] = self._seen[0]
            self._seen, self._rows = saved, None
        return logits[0]

    def _serving_feeds(self, batch: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        if self.layout.continuous_batching:
            rows = self._rows if self._rows is not None else np.arange(batch)
            feeds["batch_index"] = rows.reshape(-1, 1).astype(np.int64)
        if self.layout.compute_context:
            needed = int(positions.max(initial=0)) + 1
            length = next(n for n in self.compute_context_lengths if n >= needed)
            feeds["comp_ctx_lengths"] = np.zeros(length, np.int64)
        return feeds

    def _step_columns(self, tokens: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The step's tokens and positions (advancing each row's count), padded to a fixed seq_len."""
        positions = self._positions(valid)
        if self.fixed_len is not None:
            width = tokens.shape[1]
            if width > self.fixed_len:
                raise BadInputError(f"{self.label}: {width} columns do not fit the graph's fixed seq_len {self.fixed_len}")
            pad = ((0, 0), (0, self.fixed_len - width))
            tokens = np.pad(tokens, pad, constant_values=0)
            positions = np.pad(positions, pad, constant_values=-1)
        return tokens, positions

    def _run(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        tokens, positions = self._step_columns(tokens, valid)
        b = self._binding
        b.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, self.layout.ids_dtype))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, self.layout.positions_dtype))
        for name, value in self._serving_feeds(tokens.shape[0], positions).items():
            b.bind_cpu_input(name, value)
        if self.layout.keeps_logits:
            b.bind_cpu_input("num_logits_to_keep", np.zeros((self.keep, 1), np.int64))
        b.bind_output("logits", "cpu")  # onnxruntime allocates it: its seq dim changes between runs
        if self.binding_mode == "swap":
            for (past_k, past_v), (ret_k, ret_v) in zip(self.layout.past, self.layout.present, strict=True):
                for past, ret in ((past_k, ret_k), (past_v, ret_v)):
                    b.bind_ortvalue_input(past, self._cache[past])
                    b.bind_ortvalue_output(ret, self._spare[past])
        self.session.run_with_iobinding(b)
        self.runs += 1
        if self.binding_mode == "swap":
            self._cache, self._spare = self._spare, self._cache
        return b.get_outputs()[0].numpy()

    def rewind(self, seen: np.ndarray) -> None:
        """Forget each row's tokens from position ``seen[b]`` on (speculative decoding's rejected ones).

        Nothing in the cache changes: a query at position p reads slots <= p,
        and the next tokens write those slots before any query reads them.
        """
        seen = np.asarray(seen, np.int64)
        if seen.shape != self._seen.shape or (seen > self._seen).any() or (seen < 0).any():
            raise ValueError(f"rewind to {seen.tolist()} from {self._seen.tolist()}: only back, per row")
        self._seen = seen.copy()

    def cache_array(self, name: str) -> np.ndarray:
        """The current content of one cache buffer (for tests and debugging)."""
        return self._cache[name].numpy()

    def describe(self) -> str:
        chunk = f", prefill chunks of {self.default_chunk}" if self.default_chunk else ""
        return f"{self.kind} ({self.layout.n_layers} layers, ctx_len {self.ctx_len}{chunk}, {self.binding_mode} buffers)"


def left_aligned(tokens: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's valid tokens moved to the right end, in order; padding (token 0) before them.

    A concat graph's positions and masks come from ``attention_mask``, so
    where the padding lies does not change a valid token's logits; a graph
    that returns only the chunk's last column needs it at the left, where
    Hugging Face puts it, so that every chunk ends on each row's latest token.
    """
    tokens, valid = np.asarray(tokens, np.int64), np.asarray(valid, bool)
    order = np.argsort(valid, axis=1, kind="stable")  # padding first, then the valid columns in order
    moved = np.take_along_axis(tokens, order, axis=1)
    aligned = np.take_along_axis(valid, order, axis=1)
    return np.where(aligned, moved, 0), aligned


def _hf_positions(mask: np.ndarray) -> np.ndarray:
    """Hugging Face's position ids: cumsum(mask) - 1, padding 1."""
    m = mask.astype(np.int64)
    return np.where(m == 0, 1, np.cumsum(m, axis=1) - 1)


# --- choosing the engine for a graph ---------------------------------------------------------------


def alias_safe(model: ir.Model, layout: KVLayout) -> bool:
    """Whether ``past_*`` and its ``_RetainedState`` may share one buffer.

    True when each cache input is read only by the scatter writing it (as
    the data scattered into), by Shape, or by nodes whose every result flows
    only into that scatter's other operands (the kv-cache pass reads the
    last slot to keep it unchanged under padding). onnxruntime's sequential
    executor runs a node's ancestors before it, so all those reads happen
    before the in-place write.
    """
    inputs = {v.name: v for v in model.graph.inputs}
    for pair in layout.past:
        for name in pair:
            past = inputs[name]
            scatters = [n for n in past.consumers()
                        if ((n.domain, n.op_type) in _ALIAS_SAFE_READERS or n.op_type in _SCATTER_CUSTOM_OPS)
                        and n.op_type != "Shape" and n.inputs[0] is past]
            if len(scatters) != 1:
                return False
            feeding = _ancestors(scatters[0])
            for node in past.consumers():
                if node is scatters[0] or node.op_type == "Shape":
                    continue
                if not _flows_only_into(node, feeding, scatters[0]):
                    return False
    return True


def _ancestors(node: ir.Node) -> set[ir.Node]:
    found: set[ir.Node] = set()
    stack = [x.producer() for x in node.inputs if x is not None]
    while stack:
        n = stack.pop()
        if n is None or n in found:
            continue
        found.add(n)
        stack.extend(x.producer() for x in n.inputs if x is not None)
    return found


def _flows_only_into(node: ir.Node, feeding: set[ir.Node], target: ir.Node) -> bool:
    """Whether every node downstream of ``node`` is an ancestor of ``target`` (or ``target`` itself)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is target:
            continue
        if n not in feeding or any(o.is_graph_output() for o in n.outputs):
            return False
        stack.extend(user for o in n.outputs for user in o.consumers())
    return True


def _config_dims(config: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """(n_kv_heads, head_dim) from a transformers config, None where it does not say."""
    if not config:
        return None, None
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads and config.get("hidden_size") else None)
    return kv, head_dim


def make_engine(
    source: str | os.PathLike[str] | onnx.ModelProto | bytes,
    *,
    threads: int = DEFAULT_THREADS,
    specializations: Sequence[Mapping[str, int]] = (),
    config: Mapping[str, Any] | None = None,
    ctx_len: int | None = None,
    cache_binding: CacheBinding = "auto",
    label: str | None = None,
) -> Engine:
    """The engine for a graph of any of the three forms (read from its input and output names).

    ``specializations`` (``specializations.json``) gives the retained style's
    prefill ``seq_len`` and, when the graph leaves it symbolic, ``ctx_len``;
    ``config`` (``config.json``) gives cache dims the graph leaves symbolic.
    """
    shown = label or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the model")
    model = qio.load(source)
    from qgraph.runtime import sampling  # a graph that samples on the device (pass 'sampler')

    on_device = sampling.is_sampler_graph(model)
    try:
        layout: KVLayout | None = (sampling.sampler_layout(model, shown) if on_device
                                   else detect_kv_layout(model, label=shown))
    except KVLayoutError as cached_error:
        names = {v.name for v in model.graph.inputs}
        if any(n.startswith("past_") for n in names):
            raise
        try:
            ref = reference_layout(model, label=shown)
        except KVLayoutError as plain_error:
            raise BadInputError(f"{shown} is not a language-model graph qgraph can run:\n  as a cached graph: "
                                f"{cached_error}\n  as a no-cache graph: {plain_error}") from None
        layout = None
    payload = source.SerializeToString() if isinstance(source, onnx.ModelProto) else source
    session = open_session(payload, threads=threads, label=shown)
    max_positions = int(config["max_position_embeddings"]) if config and config.get("max_position_embeddings") else None
    if layout is None:
        return NoCacheEngine(session, label=shown, has_position_ids=ref.positions_dtype is not None,
                             max_tokens=max_positions)

    cfg_heads, cfg_head_dim = _config_dims(config)
    n_kv = layout.n_kv_heads or cfg_heads
    head_dim = layout.head_dim or cfg_head_dim
    if n_kv is None or head_dim is None:
        raise BadInputError(f"{shown}: the cache's heads/head_dim are symbolic and no config.json says them")
    if layout.style == "concat":
        if layout.max_positions is not None:  # the graph's own bound (lower-gqa's rotary caches)
            max_positions = min(max_positions or layout.max_positions, layout.max_positions)
        from qgraph.runtime.shared_cache import SharedCacheEngine, shares_buffers

        if shares_buffers(model, layout):
            return SharedCacheEngine(session, layout, label=shown, n_kv_heads=n_kv, head_dim=head_dim,
                                     max_tokens=max_positions)
        concat = ConcatEngine(session, layout, label=shown, n_kv_heads=n_kv, head_dim=head_dim, max_tokens=max_positions)
        concat.fixed_batch = layout.batch  # a graph of one batch size takes its prompts in groups of it
        return concat

    prefill = [s["seq_len"] for s in specializations if s.get("seq_len", 1) > 1]
    spec_ctx = {s["ctx_len"] for s in specializations if "ctx_len" in s}
    ctx = layout.ctx_len or ctx_len or (max(spec_ctx) if spec_ctx else None)
    if ctx is None:  # the specializations.json written beside the model (or carried as its sidecar)
        ctx = compiled_ctx_len(model, source if isinstance(source, (str, os.PathLike)) else None)
    if ctx is None:
        raise BadInputError(f"{shown}: the retained cache's ctx_len is symbolic and neither specializations.json "
                            "nor --ctx-len gives it")
    if layout.ctx_len is not None and ctx_len is not None and ctx_len != layout.ctx_len:
        raise BadInputError(f"{shown}: the graph fixes ctx_len {layout.ctx_len}; --ctx-len {ctx_len} disagrees")
    if cache_binding == "auto":
        cache_binding = "alias" if alias_safe(model, layout) else "swap"
    ccl = [s["comp_ctx_lengths"] for s in specializations if s.get("comp_ctx_lengths", 0) > 0]
    engine, extra = RetainedEngine, {}
    if on_device:
        engine, extra = sampling.DeviceSamplingEngine, sampling.sampler_dims(model, shown)
    return engine(session, layout, label=shown, ctx_len=ctx, n_kv_heads=n_kv, head_dim=head_dim,
                  prefill_len=max(prefill) if prefill else None, binding=cache_binding,
                  compute_context_lengths=[n for n in ccl if n <= ctx], **extra)

"""Recognize which KV-cache I/O contract of docs/design.md a graph follows.

Two styles (docs/design.md, "KV-cache I/O contracts"):

* **retained** (device style): inputs ``input_ids``, ``position_ids`` and per
  layer ``past_key.{i}``/``past_value.{i}`` [batch, n_kv_heads, ctx_len,
  head_dim]; outputs ``logits`` and ``past_key.{i}_RetainedState``/
  ``past_value.{i}_RetainedState``.
* **concat** (optimum / onnxruntime-genai): inputs ``input_ids``,
  ``attention_mask``, ``position_ids`` (optional here: some exports have
  none) and ``past_key_values.{i}.key``/``.value``; outputs ``logits`` and
  ``present.{i}.key``/``.value``.

:func:`detect_kv_layout` reads names, dtypes and static dims from the graph
signature only; it never runs the model. :func:`reference_layout` checks the
no-cache reference (``input_ids``, ``attention_mask``, optional
``position_ids`` -> ``logits``); :func:`has_kv_cache` tells a reference that
has a cache itself (replayed through it, :mod:`qgraph.verify.cache_steps`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from qgraph.errors import BadInputError

__all__ = ["MASKS_KEY", "MAX_POSITIONS_KEY", "KVLayout", "KVLayoutError", "ReferenceLayout", "detect_kv_layout", "has_kv_cache", "reference_layout"]

Style = Literal["retained", "concat"]

# Inputs of the retained contract's serving variants (docs/design.md): continuous batching, compute-context length.
#: Metadata key: "all-ones" when the graph is right only for unpadded rows (every attention_mask entry 1).
MASKS_KEY = "qgraph.kv.masks"
#: Metadata key: the most positions (past + new tokens) a row may hold, when the graph bounds it.
MAX_POSITIONS_KEY = "qgraph.kv.max_positions"
SERVING_INPUTS = frozenset({"batch_index", "comp_ctx_lengths"})
_RETAINED_PAST = re.compile(r"^past_(key|value)\.(\d+)$")
_CONCAT_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class KVLayoutError(BadInputError, ValueError):
    """The graph's inputs/outputs follow neither KV-cache contract (or the reference's)."""


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


def _dims(value: ir.Value) -> tuple[int | None, ...] | None:
    if value.shape is None:
        return None
    return tuple(_static(d) for d in value.shape)


def _np_dtype(value: ir.Value, default: type) -> np.dtype:
    if value.type is None or value.dtype is None:
        return np.dtype(default)
    return np.dtype(value.dtype.numpy())


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a cached graph looks like; ``None`` for a dim that is symbolic in the graph.

    ``past``/``present``: per layer, the (key, value) input names and the
    (key, value) output names that feed them on the next step.
    ``seq_len``: the static seq dim of ``input_ids`` (a fixed specialization).
    ``logits_seq``: the static seq dim of ``logits`` (1 for last-token logits).
    """

    style: Style
    n_layers: int
    n_kv_heads: int | None
    head_dim: int | None
    ctx_len: int | None  # retained only
    batch: int | None
    seq_len: int | None
    vocab: int | None
    logits_seq: int | None
    cache_dtype: np.dtype
    ids_dtype: np.dtype
    positions_dtype: np.dtype | None
    mask_dtype: np.dtype | None
    past: tuple[tuple[str, str], ...]
    present: tuple[tuple[str, str], ...]
    # retained serving variants: a batch_index input (continuous batching; the cache's first dim is then
    # full_batch_size, its static value in cache_batch) and a comp_ctx_lengths input (compute-context length)
    continuous_batching: bool = False
    compute_context: bool = False
    cache_batch: int | None = None
    keeps_logits: bool = False  # retained: a num_logits_to_keep input (logits at the last n valid tokens)
    # metadata MASKS_KEY = "all-ones": the graph computes the contract only for unpadded rows (a lowering
    # such as lower-gqa's GroupQueryAttention takes no mask); MAX_POSITIONS_KEY: the longest row it takes
    masks_all_ones: bool = False
    max_positions: int | None = None

    @property
    def has_position_ids(self) -> bool:
        return self.positions_dtype is not None

    @property
    def last_column_logits(self) -> bool:
        """A concat graph whose ``logits`` are [batch, 1, vocab]: the chunk's last column only.

        Its rows are left-padded (Hugging Face's rule), so that column is each
        row's last token of the chunk; the replay draws left padding for it
        and the runtime left-aligns what it feeds.
        """
        return self.style == "concat" and self.logits_seq == 1

    def describe(self) -> str:
        def d(x: int | None, name: str) -> str:
            return name if x is None else str(x)

        cache = f"[{d(self.batch, 'batch')}, {d(self.n_kv_heads, 'heads')}, " + (
            f"{d(self.ctx_len, 'ctx_len')}" if self.style == "retained" else "past"
        ) + f", {d(self.head_dim, 'head_dim')}]"
        logits = ", last-token logits" if self.logits_seq == 1 else ""
        return f"{self.style}-style KV cache, {self.n_layers} layer(s), cache {cache} {self.cache_dtype}{logits}"


@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
    """The no-cache reference's signature."""

    ids_dtype: np.dtype
    mask_dtype: np.dtype
    positions_dtype: np.dtype | None
    vocab: int | None
    seq_len: int | None


def _layer_indices(names: set[str], pattern: re.Pattern[str], index_group: int) -> list[int]:
    found = set()
    for name in names:
        m = pattern.match(name)
        if m:
            found.add(int(m.group(index_group)))
    return sorted(found)


def _missing_for(style: Style, layers: int, inputs: set[str], outputs: set[str]) -> list[str]:
    need_in = ["input_ids"]
    need_out = ["logits"]
    if style == "retained":
        need_in.append("position_ids")
        for i in range(layers):
            need_in += [f"past_key.{i}", f"past_value.{i}"]
            need_out += [f"past_key.{i}_RetainedState", f"past_value.{i}_RetainedState"]
    else:
        need_in.append("attention_mask")
        for i in range(layers):
            need_in += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            need_out += [f"present.{i}.key", f"present.{i}.value"]
    return [f"input {n!r}" for n in need_in if n not in inputs] + [
        f"output {n!r}" for n in need_out if n not in outputs
    ]


def detect_kv_layout(model: ir.Model, *, label: str = "the cached graph") -> KVLayout:
    """The KV layout of ``model``; raises :class:`KVLayoutError` naming what is missing."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs if v.name}
    outputs = {v.name: v for v in graph.outputs if v.name}
    in_names, out_names = set(inputs), set(outputs)

    retained = _layer_indices(in_names, _RETAINED_PAST, 2)
    concat = _layer_indices(in_names, _CONCAT_PAST, 1)
    if retained and concat:
        raise KVLayoutError(f"{label} has inputs of both KV styles (past_key.* and past_key_values.*)")
    if not retained and not concat:
        raise KVLayoutError(
            f"{label} follows neither KV-cache contract of docs/design.md: no cache inputs found.\n"
            "  retained style needs: inputs 'input_ids', 'position_ids', 'past_key.{i}', 'past_value.{i}'; "
            "outputs 'logits', 'past_key.{i}_RetainedState', 'past_value.{i}_RetainedState'\n"
            "  concat style needs: inputs 'input_ids', 'attention_mask', 'past_key_values.{i}.key'/'.value'; "
            "outputs 'logits', 'present.{i}.key'/'.value'\n"
            f"  its inputs: {sorted(in_names)}; its outputs: {sorted(out_names)}"
        )
    style: Style = "retained" if retained else "concat"
    indices = retained or concat
    layers = max(indices) + 1
    missing = _missing_for(style, layers, in_names, out_names)
    if missing:
        gaps = sorted(set(range(layers)) - set(indices))
        extra = f" (layer indices found: {indices}; missing layers {gaps})" if gaps else ""
        raise KVLayoutError(f"{label} looks {style}-style but lacks " + ", ".join(missing) + extra)

    allowed = {"input_ids", "position_ids", "attention_mask"} | {
        n for n in in_names if (_RETAINED_PAST if style == "retained" else _CONCAT_PAST).match(n)
    }
    if style == "retained":
        allowed.discard("attention_mask")  # the retained contract has no mask input
        allowed |= SERVING_INPUTS & in_names
        allowed.add("num_logits_to_keep")  # a speculative-decoding target's (only its length is read)
    unknown = sorted(in_names - allowed)
    if unknown:
        raise KVLayoutError(f"{label} ({style} style) has inputs outside the contract, which the replay cannot feed: {unknown}")

    if style == "retained":
        past = tuple((f"past_key.{i}", f"past_value.{i}") for i in range(layers))
        present = tuple((f"{k}_RetainedState", f"{v}_RetainedState") for k, v in past)
    else:
        past = tuple((f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(layers))
        present = tuple((f"present.{i}.key", f"present.{i}.value") for i in range(layers))

    cache_dims = _dims(inputs[past[0][0]])
    if cache_dims is not None and len(cache_dims) != 4:
        raise KVLayoutError(
            f"{label}: {past[0][0]} has rank {len(cache_dims)}; the contract is [batch, n_kv_heads, len, head_dim]"
        )
    cache_dims = cache_dims or (None, None, None, None)
    ids_dims = _dims(inputs["input_ids"]) or (None, None)
    logits_dims = _dims(outputs["logits"])
    if logits_dims is not None and len(logits_dims) != 3:
        raise KVLayoutError(f"{label}: 'logits' has rank {len(logits_dims)}; expected [batch, seq, vocab]")
    logits_dims = logits_dims or (None, None, None)
    pos = inputs.get("position_ids")
    mask = inputs.get("attention_mask")
    return KVLayout(
        style=style,
        n_layers=layers,
        n_kv_heads=cache_dims[1],
        head_dim=cache_dims[3],
        ctx_len=cache_dims[2] if style == "retained" else None,
        batch=ids_dims[0] if len(ids_dims) > 0 else None,
        seq_len=ids_dims[1] if len(ids_dims) > 1 else None,
        vocab=logits_dims[2],
        logits_seq=logits_dims[1],
        cache_dtype=_np_dtype(inputs[past[0][0]], np.float32),
        ids_dtype=_np_dtype(inputs["input_ids"], np.int64),
        positions_dtype=None if pos is None else _np_dtype(pos, np.int64),
        mask_dtype=None if mask is None else _np_dtype(mask, np.int64),
        past=past,
        present=present,
        continuous_batching="batch_index" in in_names,
        compute_context="comp_ctx_lengths" in in_names,
        cache_batch=cache_dims[0],
        keeps_logits="num_logits_to_keep" in in_names,
        masks_all_ones=model.metadata_props.get(MASKS_KEY) == "all-ones",
        max_positions=_metadata_int(model, MAX_POSITIONS_KEY, label),
    )


def _metadata_int(model: ir.Model, key: str, label: str) -> int | None:
    text = model.metadata_props.get(key)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise KVLayoutError(f"{label}: metadata {key}={text!r} is not an integer") from None


def has_kv_cache(model: ir.Model) -> bool:
    """Whether ``model`` has cache inputs of either style (names only; :func:`detect_kv_layout` checks the rest)."""
    return any(v.name and (_RETAINED_PAST.match(v.name) or _CONCAT_PAST.match(v.name)) for v in model.graph.inputs)


def reference_layout(model: ir.Model, *, label: str = "the reference") -> ReferenceLayout:
    """Check the no-cache reference's signature; raises :class:`KVLayoutError`."""
    inputs = {v.name: v for v in model.graph.inputs if v.name}
    outputs = {v.name: v for v in model.graph.outputs if v.name}
    missing = [f"input {n!r}" for n in ("input_ids", "attention_mask") if n not in inputs]
    missing += [f"output {n!r}" for n in ("logits",) if n not in outputs]
    if missing:
        raise KVLayoutError(
            f"{label} is not a no-cache LM graph (input_ids, attention_mask[, position_ids] -> logits): "
            f"it lacks {', '.join(missing)}"
        )
    cache_inputs = sorted(n for n in inputs if _RETAINED_PAST.match(n) or _CONCAT_PAST.match(n))
    if cache_inputs:
        raise KVLayoutError(f"{label} should be the no-cache graph but has cache inputs {cache_inputs}")
    extra = sorted(set(inputs) - {"input_ids", "attention_mask", "position_ids"})
    if extra:
        raise KVLayoutError(f"{label} has inputs the replay cannot feed: {extra}")
    ids_dims = _dims(inputs["input_ids"]) or (None, None)
    logits_dims = _dims(outputs["logits"]) or (None, None, None)
    pos = inputs.get("position_ids")
    return ReferenceLayout(
        ids_dtype=_np_dtype(inputs["input_ids"], np.int64),
        mask_dtype=_np_dtype(inputs["attention_mask"], np.int64),
        positions_dtype=None if pos is None else _np_dtype(pos, np.int64),
        vocab=logits_dims[2] if len(logits_dims) == 3 else None,
        seq_len=ids_dims[1] if len(ids_dims) > 1 else None,
    )

"""What a concat-cache layer's rotary tables and attention mask compute, read by running them.

``lower-gqa`` hands a layer's attention to onnxruntime's
``com.microsoft::GroupQueryAttention``, which computes two things itself
that the graph spelled out: the rotary angles of each token (from a
``cos_cache`` / ``sin_cache`` table indexed by position) and the causal
mask (with ``local_window_size`` for a sliding window). Both are rebuilt
only when running the graph's own subgraphs shows they are that function:

* **rotary tables.** The ``cos`` / ``sin`` operands of the layer's
  ``RotaryEmbedding`` must be computed from ``position_ids`` alone, one row
  per position: fed positions ``0 .. N-1`` they give the cache rows; fed the
  same positions reversed, and a shorter run of them, they must give the same
  rows in that order (a table that depends on the sequence length, such as
  dynamic NTK scaling, or mixes positions, fails here and is reported).
* **mask.** With an all-ones ``attention_mask`` of batch 1 (the only masks a
  lowered graph takes), the mask subgraph must hide exactly the keys a causal
  mask with at most a sliding window hides, in a prefill and in a chunk that
  follows a past -- no bias on the visible scores (ALiBi), no bidirectional
  keys. Probing reuses the kv-cache pass's slice runner and mask reader.

Every function returns the value or a sentence saying why not; the pass
puts that sentence in its report, naming the layer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.kv_cache.probe import ProbeError, backward_slice, mask_meaning, probe_length, run_slice, shape_cuts

__all__ = ["causal_window", "rotary_cache"]


def _inputs_read(model: ir.Model, values: list[ir.Value]) -> set[str]:
    _, inputs, _ = backward_slice(model.graph, values, cut=shape_cuts(model)[1])
    return {v.name for v in inputs}


def rotary_cache(model: ir.Model, cos: ir.Value, sin: ir.Value, rows: int) -> tuple[np.ndarray, np.ndarray] | str:
    """``(cos_cache, sin_cache)`` [rows, D/2] if the tables are a per-position function of position_ids, else why not."""
    read = _inputs_read(model, [cos, sin])
    if read != {"position_ids"}:
        return f"the rotary tables '{cos.name}', '{sin.name}' read {sorted(read)}, not position_ids alone"
    forward = np.arange(rows, dtype=np.int64)[None]
    backward = forward[:, ::-1].copy()
    short = forward[:, : max(1, rows // 3)].copy()
    try:
        (c, s), (c_back, s_back), (c_short, s_short) = run_slice(
            model, [cos, sin], [{"position_ids": p} for p in (forward, backward, short)])
    except ProbeError as error:
        return f"the rotary tables could not be probed for {rows} positions: {error}"
    if c.ndim != 3 or c.shape[:2] != (1, rows) or s.shape != c.shape:
        return f"the rotary tables have shape {list(c.shape)} for positions [1, {rows}], not [1, {rows}, D/2]"
    if not (np.array_equal(c_back[0], c[0, ::-1]) and np.array_equal(s_back[0], s[0, ::-1])):
        return "the rotary tables' rows are not a function of each row's own position (reversed positions differ)"
    n = short.shape[1]
    if not (np.array_equal(c_short[0], c[0, :n]) and np.array_equal(s_short[0], s[0, :n])):
        return "the rotary tables depend on the sequence length (a shorter run gives other rows)"
    return np.ascontiguousarray(c[0]), np.ascontiguousarray(s[0])


def _feeds(model: ir.Model, past: int, seq: int) -> dict[str, np.ndarray]:
    """Batch-1 feeds of a step of ``seq`` tokens after ``past`` ones, mask all ones."""
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.zeros((1, seq), np.int64),
        "attention_mask": np.ones((1, past + seq), np.int64),
        "position_ids": (past + np.arange(seq, dtype=np.int64))[None],
    }
    for value in model.graph.inputs:
        if value.name and value.name.startswith("past_key_values.") and value.shape is not None:
            dims = [d if isinstance(d, int) else 0 for d in value.shape]
            dims[0], dims[2] = 1, past
            feeds[value.name] = np.zeros(dims, value.dtype.numpy() if value.dtype else np.float32)
    for value in model.graph.inputs:
        if value.name in feeds and value.dtype is not None:
            feeds[value.name] = feeds[value.name].astype(value.dtype.numpy())
    return feeds


def causal_window(model: ir.Model, mask: ir.Value) -> int | None | str:
    """The sliding window of a causal mask (None: unbounded), or why ``mask`` is not one for all-ones masks."""
    read = _inputs_read(model, [mask])
    unknown = read - {"input_ids", "attention_mask", "position_ids"} - {
        v.name for v in model.graph.inputs if v.name and v.name.startswith("past_key_values.")}
    if unknown:
        return f"the mask '{mask.name}' reads inputs {sorted(unknown)}"
    length = probe_length(model, [mask])
    past = length // 2
    try:
        prefill, chunk = run_slice(model, [mask], [_feeds(model, 0, length), _feeds(model, past, length - past)])
    except ProbeError as error:
        return f"the mask '{mask.name}' could not be probed: {error}"
    prefill, chunk = prefill[0], chunk[0]
    try:
        meaning = mask_meaning(prefill, np.ones((1, length), bool), is_causal=False)
    except ProbeError as error:
        return f"the mask '{mask.name}': {error}"
    if meaning.slopes is not None:
        return f"the mask '{mask.name}' adds a key-position bias (ALiBi), which GroupQueryAttention has no input for"
    # the same mask once a past is cached: the chunk's queries are the last rows of the prefill's
    if chunk.shape[-2:] != (length - past, length):
        return f"the mask '{mask.name}' of a {length - past}-token chunk after {past} has shape {list(chunk.shape)}"
    visible = np.broadcast_to(prefill, (1, 1, length, length))[0, 0, past:]
    got = chunk[0, 0] if chunk.dtype == np.bool_ else chunk[0, 0] > np.finfo(chunk.dtype).min / 4
    expected = visible if visible.dtype == np.bool_ else visible > np.finfo(visible.dtype).min / 4
    if not np.array_equal(got, expected):
        return f"the mask '{mask.name}' of a chunk after a past is not the prefill mask's last rows"
    return meaning.window

"""What a concat-cache layer's rotary tables and attention mask compute, read by running them.

``lower-gqa`` hands a layer's attention to onnxruntime's
``com.microsoft::GroupQueryAttention``, which computes two things itself
that the graph spelled out: the rotary angles of each token (from a
``cos_cache`` / ``sin_cache`` table indexed by position) and the causal
mask (with ``local_window_size`` for a sliding window). Both are rebuilt
only when running the graph's own subgraphs shows they are that function:

* **rotary tables.** The ``cos`` / ``sin`` operands of the layer's
  ``RotaryEmbedding`` must be computed from the values of ``position_ids``
  alone (other inputs' dims may shape them: a plain export's batch-1 table
  broadcast to the batch), one row per position: fed a batch of positions
  ``0 .. N-1`` and the same reversed they give the cache rows in that order
  in both rows, and a shorter run gives the same rows (a table that depends
  on the sequence length, such as dynamic NTK scaling, mixes positions or
  rows, fails here and is reported).
* **mask.** With an all-ones ``attention_mask`` of batch 1 (the only masks a
  lowered graph takes), the mask subgraph must hide exactly the keys a causal
  mask with at most a sliding window hides, in a prefill and in a chunk that
  follows a past, and no bidirectional keys. A bias on the visible scores
  (ALiBi: slope * key position, per head) is allowed only where the mask
  goes into the kernel whole, as its ``attention_bias`` (``mask=bias``);
  without it nothing would add the bias. Probing reuses the kv-cache pass's
  slice runner and mask reader.

Every function returns the value or a sentence saying why not; the pass
puts that sentence in its report, naming the layer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qgraph_passes.kv_cache.probe import ProbeError, backward_slice, mask_meaning, probe_length, run_slice, shape_cuts

__all__ = ["causal_window", "rotary_cache"]


def _inputs_read(model: ir.Model, values: list[ir.Value], *, dims_too: bool = True) -> set[str]:
    """The graph inputs ``values`` read: their values only, or (``dims_too``) also their dims through ``Shape``."""
    if dims_too:
        cut = shape_cuts(model)[1]
    else:  # a Shape reads its operand's dims, never its values
        cut = {node: [] for node in model.graph if node.op_type == "Shape"}
    _, inputs, _ = backward_slice(model.graph, values, cut=cut)
    return {v.name for v in inputs}


def rotary_cache(model: ir.Model, cos: ir.Value, sin: ir.Value, rows: int) -> tuple[np.ndarray, np.ndarray] | str:
    """``(cos_cache, sin_cache)`` [rows, D/2] if the tables are a per-position function of position_ids, else why not.

    The tables may read other inputs' dims (a batch-1 table broadcast to the query's batch and length with
    ``Expand(table, Shape(input_ids))``), never their values. They are probed on a batch of two rows, the
    second row's positions reversed, so a table that mixes rows or reads only the first row fails too.
    """
    read = _inputs_read(model, [cos, sin], dims_too=False)
    if read != {"position_ids"}:
        return f"the rotary tables '{cos.name}', '{sin.name}' read {sorted(read)}, not position_ids alone"
    forward = np.arange(rows, dtype=np.int64)
    short = max(1, rows // 3)
    runs = [np.stack([forward, forward[::-1]]), np.stack([forward[:short], forward[:short][::-1]])]
    try:
        (c, s), (c_short, s_short) = run_slice(model, [cos, sin], [_feeds(model, 0, p.shape[1], p) for p in runs])
    except ProbeError as error:
        return f"the rotary tables could not be probed for {rows} positions: {error}"
    if c.ndim != 3 or c.shape[:2] != (2, rows) or s.shape != c.shape:
        return f"the rotary tables have shape {list(c.shape)} for positions [2, {rows}], not [2, {rows}, D/2]"
    if not (np.array_equal(c[1], c[0, ::-1]) and np.array_equal(s[1], s[0, ::-1])):
        return "the rotary tables' rows are not a function of each row's own position (reversed positions differ)"
    if not (np.array_equal(c_short[0], c[0, :short]) and np.array_equal(s_short[0], s[0, :short])
            and np.array_equal(c_short[1], c[0, :short][::-1]) and np.array_equal(s_short[1], s[0, :short][::-1])):
        return "the rotary tables depend on the sequence length (a shorter run gives other rows)"
    return np.ascontiguousarray(c[0]), np.ascontiguousarray(s[0])


def _feeds(model: ir.Model, past: int, seq: int, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds of a step of ``seq`` tokens after ``past`` ones, mask all ones (batch 1 unless ``positions`` say)."""
    if positions is None:
        positions = (past + np.arange(seq, dtype=np.int64))[None]
    batch = positions.shape[0]
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.zeros((batch, seq), np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": positions,
    }
    for value in model.graph.inputs:
        if value.name and value.name.startswith("past_key_values.") and value.shape is not None:
            dims = [d if isinstance(d, int) else 0 for d in value.shape]
            dims[0], dims[2] = batch, past
            feeds[value.name] = np.zeros(dims, value.dtype.numpy() if value.dtype else np.float32)
    for value in model.graph.inputs:
        if value.name in feeds and value.dtype is not None:
            feeds[value.name] = feeds[value.name].astype(value.dtype.numpy())
    return feeds


def causal_window(model: ir.Model, mask: ir.Value, *, bias_goes_in: bool = False) -> int | None | str:
    """The sliding window of a causal mask (None: unbounded), or why ``mask`` is not one for all-ones masks.

    ``bias_goes_in``: the mask itself becomes the kernel's attention_bias, so a bias it adds to the scores it
    shows (ALiBi) is computed; the keys it hides must still be the causal ones the kernel hides itself.
    """
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
    if meaning.slopes is not None and not bias_goes_in:
        return (f"the mask '{mask.name}' adds a key-position bias (ALiBi), which mask=none leaves out (mask=bias "
                "passes it in as attention_bias)")
    # the same mask once a past is cached: the chunk's queries are the last rows of the prefill's
    if chunk.shape[-2:] != (length - past, length):
        return f"the mask '{mask.name}' of a {length - past}-token chunk after {past} has shape {list(chunk.shape)}"
    # (one mask for all heads, or one per head: ALiBi's)
    visible = prefill[0, :, past:]
    got = chunk[0] if chunk.dtype == np.bool_ else chunk[0] > np.finfo(chunk.dtype).min / 4
    expected = visible if visible.dtype == np.bool_ else visible > np.finfo(visible.dtype).min / 4
    if got.shape != expected.shape or not np.array_equal(got, expected):
        return f"the mask '{mask.name}' of a chunk after a past is not the prefill mask's last rows"
    return meaning.window

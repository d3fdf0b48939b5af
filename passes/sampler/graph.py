"""The sampling subgraph: penalty buffers, penalties, temperature, top-k/top-p/min-p, Gumbel-max.

Each function below is one step of QEfficient's on-device sampler, written
as ONNX ops on values of the graph (names as in its contract):

* :func:`update_penalty_buffers` -- the retained bool buffers [rows, V]
  remember which tokens a sequence has seen: prefill (more input columns
  than logits positions) clears a row whose chunk holds position 0 and adds
  its valid ``input_ids`` to the repetition buffer and clears the presence
  buffer (presence counts generated tokens only); decode adds the valid
  ``last_accepted_output_tokens`` to both. Padding (position -1) never
  counts. Writes are a ScatterElements with ``reduction="add"`` of 0/1 into
  int32, so a padding column adds 0 to token 0 instead of needing an
  out-of-range index (QEfficient's INT32_MAX trick, which onnxruntime
  rejects).
* :func:`apply_penalties` -- repetition: a seen token's logit is divided by
  the penalty when positive, multiplied when negative; presence: the penalty
  is subtracted from a generated token's logit.
* :func:`scale_by_temperature`, :func:`filter_top_k_top_p_min_p` and
  :func:`gumbel_max` -- the random branch over the ``max_top_k_ids`` largest
  scaled logits in ascending order, so ``random_numbers[b, j]`` pairs with
  the j-th smallest of them, as in QEfficient; rows of temperature 0 take
  the greedy token (argmax of the penalized logits).

Sampling parameters are per batch row ([B, 1]) and apply to every logits
position of the row (the K+1 positions of a speculative target); QEfficient
tiles them over the flattened [B*S] rows, which pairs the same parameters
when B = 1 or S = 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph_passes.sampler.ops import Ops

__all__ = ["FP16_MIN", "SamplerValues", "build_sampler"]

#: What a filtered-out slot's logit becomes: QEfficient's fill (float16's lowest), exp() of it is 0.
FP16_MIN = float(np.finfo(np.float16).min)


@dataclasses.dataclass
class SamplerValues:
    """The graph values the sampler reads (``batch_index`` None without continuous batching)."""

    logits: ir.Value  # [B, S, V] float
    input_ids: ir.Value  # [B, Sin] int
    position_ids: ir.Value  # [B, Sin] int, -1 = padding
    batch_index: ir.Value | None  # [B, 1] int64: rows of the buffers this batch owns
    last_accepted_output_tokens: ir.Value
    repetition_buffer: ir.Value  # [rows, V] bool
    presence_buffer: ir.Value
    repetition_penalties: ir.Value  # [B, 1] float
    presence_penalties: ir.Value
    temperatures: ir.Value
    top_ks: ir.Value  # [B, 1] int32
    top_ps: ir.Value
    min_ps: ir.Value
    random_numbers: ir.Value  # [B, max_top_k_ids] float in (0, 1)
    token_bitmasks: ir.Value | None = None  # [B, V] bool: tokens allowed (guided decoding)


def _mark_tokens(o: Ops, rows: ir.Value, tokens: ir.Value, valid: ir.Value) -> ir.Value:
    """rows[b, tokens[b, s]] += 1 wherever valid[b, s] (int32 counts: nonzero = seen); padding adds 0 to token 0."""
    index = o.op("Where", valid, o.cast(tokens, ir.DataType.INT64), o.const(0))
    return o.op("ScatterElements", o.cast(rows, ir.DataType.INT32), index, o.cast(valid, ir.DataType.INT32),
                axis=1, reduction="add")


def update_penalty_buffers(o: Ops, v: SamplerValues) -> tuple[ir.Value, ir.Value]:
    """The new repetition and presence buffers (full size: [rows, V])."""
    positions = v.position_ids
    valid = o.op("GreaterOrEqual", positions, o.const(0, positions.dtype.numpy()))
    if v.batch_index is not None:  # continuous batching: this batch's rows of the full buffers
        rows_index = o.op("Reshape", v.batch_index, o.const([-1]))
        repetition = o.op("Gather", v.repetition_buffer, rows_index, axis=0)
        presence = o.op("Gather", v.presence_buffer, rows_index, axis=0)
    else:
        repetition, presence = v.repetition_buffer, v.presence_buffer
    # prefill: a chunk holding position 0 starts a new sequence in its row
    starts = o.op("Equal", positions, o.const(0, positions.dtype.numpy()))
    starts = o.cast(o.reduce("ReduceMax", o.cast(starts, ir.DataType.INT32), [1]), ir.DataType.BOOL)  # [B, 1]
    kept = o.op("And", repetition, o.op("Not", starts))
    prefill_repetition = _mark_tokens(o, kept, v.input_ids, valid)
    prefill_presence = o.op("Mul", o.cast(presence, ir.DataType.INT32), o.const(0, np.int32))
    # decode: the tokens accepted since the last step
    decode_repetition = _mark_tokens(o, repetition, v.last_accepted_output_tokens, valid)
    decode_presence = _mark_tokens(o, presence, v.last_accepted_output_tokens, valid)
    columns = o.op("Shape", v.input_ids, start=1, end=2)
    positions_out = o.op("Shape", v.logits, start=1, end=2)
    is_prefill = o.op("Greater", columns, positions_out)  # [1]
    # (onnxruntime has no Where on bool: select the int32 counts, then cast)
    repetition = o.cast(o.op("Where", is_prefill, prefill_repetition, decode_repetition), ir.DataType.BOOL)
    presence = o.cast(o.op("Where", is_prefill, prefill_presence, decode_presence), ir.DataType.BOOL)
    if v.batch_index is not None:
        repetition = o.op("ScatterND", v.repetition_buffer, v.batch_index, repetition)
        presence = o.op("ScatterND", v.presence_buffer, v.batch_index, presence)
    return repetition, presence


def _rows_of(o: Ops, buffer: ir.Value, batch_index: ir.Value | None) -> ir.Value:
    """The batch's rows of a full buffer, as [B, 1, V] to broadcast over the logits positions."""
    if batch_index is not None:
        buffer = o.op("Gather", buffer, o.op("Reshape", batch_index, o.const([-1])), axis=0)
    return o.unsqueeze(buffer, [1])


def _per_row(o: Ops, parameter: ir.Value, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
    """A [B, 1] parameter as [B, 1, 1], in ``dtype``."""
    return o.unsqueeze(o.cast(parameter, dtype), [2])


def apply_penalties(o: Ops, logits: ir.Value, repetition: ir.Value, presence: ir.Value, v: SamplerValues) -> ir.Value:
    seen = _rows_of(o, repetition, v.batch_index)
    penalty = _per_row(o, v.repetition_penalties)
    positive = o.op("Greater", logits, o.const(0.0, np.float32))
    penalized = o.op("Where", positive, o.op("Div", logits, penalty), o.op("Mul", logits, penalty))
    logits = o.op("Where", seen, penalized, logits)
    generated = o.cast(_rows_of(o, presence, v.batch_index), ir.DataType.FLOAT)
    return o.op("Sub", logits, o.op("Mul", _per_row(o, v.presence_penalties), generated))


def scale_by_temperature(o: Ops, logits: ir.Value, greedy_rows: ir.Value, temperatures: ir.Value) -> ir.Value:
    """logits / temperature (rows of temperature 0 are left as they are: they take the greedy token)."""
    return o.op("Where", greedy_rows, logits, o.op("Div", logits, temperatures))


def filter_top_k_top_p_min_p(o: Ops, scaled: ir.Value, max_top_k: int, v: SamplerValues
                             ) -> tuple[ir.Value, ir.Value]:
    """(values, token ids) of the ``max_top_k`` largest, ascending; filtered-out values set to FP16_MIN.

    top-k: a row keeps its k largest (k <= 0 or k > max_top_k: all max_top_k);
    top-p: drops the smallest tokens while their cumulative probability (over
    the top-k set) is at most 1 - top_p, never the largest; min-p: drops a
    token whose top-k probability is below min_p times the largest one's.
    """
    values, ids = o.op("TopK", scaled, o.const([max_top_k]), axis=-1, largest=1, sorted=1, outputs=2)
    flip = (o.const([-1]), o.const([-(2**62)]), o.const([2]), o.const([-1]))
    values = o.op("Slice", values, *flip)  # ascending: the largest is last
    ids = o.op("Slice", ids, *flip)
    low = o.const(FP16_MIN, np.float32)
    slots = o.const(np.arange(max_top_k).reshape(1, 1, max_top_k))
    k = _per_row(o, v.top_ks, ir.DataType.INT64)
    limit = o.const(max_top_k)
    unlimited = o.op("Or", o.op("LessOrEqual", k, o.const(0)), o.op("Greater", k, limit))
    k = o.op("Where", unlimited, limit, k)
    values = o.op("Where", o.op("Less", slots, o.op("Sub", limit, k)), low, values)
    probs = o.op("Softmax", values, axis=-1)
    cumulative = o.op("CumSum", probs, o.const(2))
    tail = o.op("LessOrEqual", cumulative, o.op("Sub", o.const(1.0, np.float32), _per_row(o, v.top_ps)))
    not_largest = o.const((np.arange(max_top_k) < max_top_k - 1).reshape(1, 1, max_top_k), np.bool_)
    values = o.op("Where", o.op("And", tail, not_largest), low, values)
    largest = o.op("Slice", probs, o.const([max_top_k - 1]), o.const([max_top_k]), o.const([2]))
    below_min = o.op("Less", probs, o.op("Mul", _per_row(o, v.min_ps), largest))
    values = o.op("Where", below_min, low, values)
    return values, ids


def gumbel_max(o: Ops, values: ir.Value, ids: ir.Value, random_numbers: ir.Value) -> ir.Value:
    """The token drawn from softmax(values): argmax(values - log(-log(u))), u ~ U(0, 1) per slot."""
    u = o.unsqueeze(o.cast(random_numbers, ir.DataType.FLOAT), [1])  # [B, 1, max_top_k]: same u at every position
    noise = o.op("Neg", o.op("Log", o.op("Neg", o.op("Log", u))))
    slot = o.op("ArgMax", o.op("Add", values, noise), axis=2, keepdims=1)
    return o.op("GatherElements", ids, slot, axis=2)


def probabilities(o: Ops, logits: ir.Value, values: ir.Value, ids: ir.Value) -> ir.Value:
    """[B, S, V] softmax of the filtered values scattered back over the vocabulary (``return_pdfs``)."""
    full = o.op("Expand", o.const(FP16_MIN, np.float32), o.op("Shape", logits))
    return o.op("Softmax", o.op("ScatterElements", full, ids, values, axis=2), axis=-1)


def build_sampler(o: Ops, v: SamplerValues, *, max_top_k: int, return_pdfs: bool
                  ) -> tuple[ir.Value, ir.Value | None, ir.Value, ir.Value]:
    """(next_tokens [B, S, 1] int64, probs or None, repetition buffer, presence buffer)."""
    logits = v.logits if v.logits.dtype == ir.DataType.FLOAT else o.cast(v.logits, ir.DataType.FLOAT)
    if v.token_bitmasks is not None:  # guided decoding: disallowed tokens get float16's lowest logit
        allowed = o.unsqueeze(o.cast(v.token_bitmasks, ir.DataType.BOOL), [1])
        logits = o.op("Where", allowed, logits, o.const(FP16_MIN, np.float32))
    repetition, presence = update_penalty_buffers(o, v)
    logits = apply_penalties(o, logits, repetition, presence, v)
    greedy = o.op("ArgMax", logits, axis=2, keepdims=1)
    temperatures = _per_row(o, v.temperatures)
    greedy_rows = o.op("Equal", temperatures, o.const(0.0, np.float32))
    scaled = scale_by_temperature(o, logits, greedy_rows, temperatures)
    values, ids = filter_top_k_top_p_min_p(o, scaled, max_top_k, v)
    sampled = gumbel_max(o, values, ids, v.random_numbers)
    next_tokens = o.op("Where", greedy_rows, greedy, sampled)
    probs = probabilities(o, scaled, values, ids) if return_pdfs else None
    return next_tokens, probs, repetition, presence

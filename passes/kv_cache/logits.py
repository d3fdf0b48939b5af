"""Logits at each row's last K+1 valid positions: the target side of speculative decoding.

A target model scoring K draft tokens needs its logits at K+1 positions
(the last accepted token and the K proposals) from one run. QEfficient's
TLM contract, which a device runtime drives, is reproduced here on the
graph instead of in each model's PyTorch code:

* input ``num_logits_to_keep`` int64 ``[num_logits_to_keep, 1]`` -- only its
  length ``n`` is read (so one graph serves prefill with ``n = 1`` and decode
  with ``n = K + 1``);
* output ``logits`` ``[batch, n, vocab]``: with ``last`` the column of each
  row's largest position (its last valid token), the columns
  ``lower .. lower + n - 1`` where ``lower = 0`` if ``last < n`` else
  ``last + 1 - n`` -- the last n columns ending at the last valid token, or
  the first n columns when the row has fewer than n columns up to it.

One deviation, for onnxruntime only: a column past the chunk (``n`` larger
than the chunk, which no specialization compiles) reads the chunk's last
column instead of failing, so a runtime may ask for fewer tokens than it
fed near the end of the context without a second graph.

The gather runs on the hidden state before the LM head, as the last-token
gather does (``GraphBuilder.gather_last_valid``): the head then runs on n
rows, not on the whole chunk.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.errors import BadInputError

__all__ = ["NUM_LOGITS_TO_KEEP", "add_num_logits_to_keep", "check_speculative_options", "gather_last_k_valid",
           "speculative_symbols"]

NUM_LOGITS_TO_KEEP = "num_logits_to_keep"


def check_speculative_options(num_speculative_tokens: int, *, style: str, logits: str, prefill_len: int,
                              ctx_len: int) -> None:
    """Refuse option combinations the K+1 gather cannot serve, naming the option at fault."""
    k = num_speculative_tokens
    if k == 0:
        return
    if k < 0:
        raise BadInputError(f"option 'kv-cache.num_speculative_tokens': must be >= 0 (0 = off), got {k}")
    if style != "retained":
        raise BadInputError("option 'kv-cache.num_speculative_tokens': needs style 'retained' "
                            f"(the concat form returns every position already), got style {style!r}")
    if logits != "last":
        raise BadInputError("option 'kv-cache.num_speculative_tokens': needs logits 'last' (the K+1 kept logits "
                            f"replace the last-token gather), got logits {logits!r}")
    if k + 1 > ctx_len - 1:
        raise BadInputError(f"option 'kv-cache.num_speculative_tokens': K + 1 = {k + 1} tokens do not fit "
                            f"ctx_len {ctx_len} (at most ctx_len - 1 tokens per sequence)")
    if prefill_len < k + 1:
        raise BadInputError(f"option 'kv-cache.prefill_len': the prefill chunk ({prefill_len}) must be at least "
                            f"num_speculative_tokens + 1 ({k + 1}), as the decode chunk is")


def add_num_logits_to_keep(graph: ir.Graph) -> ir.Value:
    """The ``num_logits_to_keep`` input [num_logits_to_keep, 1] int64, appended after the other inputs."""
    value = ir.Value(name=NUM_LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64),
                     shape=ir.Shape([NUM_LOGITS_TO_KEEP, 1]))
    graph.inputs.append(value)
    return value


def gather_last_k_valid(b, hidden: ir.Value, positions: ir.Value, keep: ir.Value) -> ir.Value:
    """hidden [B, S, H] at the n = len(keep) columns ending at each row's last valid token -> [B, n, H].

    ``b`` is the kv-cache pass's ``GraphBuilder``.
    """
    n = b.dim(keep, 0)  # [1]
    last = b.op("ArgMax", positions, axis=1, keepdims=1)  # [B, 1]: column of the largest position
    lower = b.op("Where", b.op("Less", last, n), b.const([[0]]), b.op("Sub", b.op("Add", last, b.const(1)), n))
    steps = b.op("Unsqueeze", b.op("Range", b.const(0), b.op("Squeeze", n, b.const([0])), b.const(1)),
                 b.const([0]))  # [1, n]
    columns = b.op("Add", lower, steps)  # [B, n]
    last_column = b.op("Sub", b.dim(hidden, 1), b.const(1))
    columns = b.op("Min", columns, last_column, name=b.fresh("kept_columns"))  # only when n > S (see module doc)
    grid = b.op("Concat", b.dim(hidden, 0), n, b.dim(hidden, 2), axis=0)
    index = b.op("Expand", b.op("Unsqueeze", columns, b.const([2])), grid)
    return b.op("GatherElements", hidden, index, axis=1)


def speculative_symbols(num_speculative_tokens: int) -> dict[str, dict[str, str]]:
    """The extra specialization symbols per phase: Prefill keeps 1 logit, Decode K+1 (and seq_len K+1)."""
    k = num_speculative_tokens
    if k == 0:
        return {}
    return {"Prefill": {NUM_LOGITS_TO_KEEP: "1"}, "Decode": {"seq_len": str(k + 1), NUM_LOGITS_TO_KEEP: str(k + 1)}}

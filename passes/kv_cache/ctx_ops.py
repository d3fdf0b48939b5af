"""``com.qualcomm.cloud`` cache ops: the device's writes into, and reads from, a retained cache.

The Cloud AI 100 compiler recognizes these ops and keeps the retained state
in place; onnxruntime runs their function bodies (ScatterND / GatherND), so
a graph that uses them can still be checked against the no-cache graph.
The names, domain and argument order are QEfficient's, so its runtime and
compiler take qgraph's graphs as their own. Every body only uses ops that
exist from opset 13 to 23 (Unsqueeze and Squeeze with axes as inputs),
because the qaic preset lowers the default opset to 17 after the KV-cache
pass has attached them.

Semantics (every head of a row shares the row's slots):

* ``CtxScatter(data [B, H, C, D], slots [B, S], updates [B, H, S, D])``
  writes ``updates[b, h, s]`` into ``data[b, h, slots[b, s]]``.
* ``CtxGather(data [B, H, C, D], ctx_indices [B or 1, 1, L], comp_ctx_len [1])``
  reads ``data[b, h, ctx_indices[b, 0, l]]`` -> [B, H, L, D]; ``comp_ctx_len``
  is L (the compute-context length the device specializes on).
* ``CtxScatterCB(data [F, H, C, D], batch_index [B, 1], slots [B, S], updates [B, H, S, D])``
  writes into cache row ``batch_index[b]`` (continuous batching: F slots,
  B rows running).
* ``CtxGatherCB(data [F, H, C, D], batch_index [B, 1], ctx_indices [B, 1, L], comp_ctx_len [1])``
  reads rows ``batch_index`` -> [B, H, L, D].

Where QEfficient's export marks unused gather indices with INT32_MAX (which
onnxruntime rejects as out of range), qgraph's graphs give every index a
slot that exists; the mask already hides what is read there.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript
from onnxscript import opset17 as op
from onnxscript.values import Opset

from qgraph.custom_ops import function_from_script

__all__ = [
    "CTX_DOMAIN",
    "ctx_gather_cb_function",
    "ctx_gather_function",
    "ctx_scatter_cb_function",
    "ctx_scatter_function",
]

CTX_DOMAIN = "com.qualcomm.cloud"
_QAIC = Opset(CTX_DOMAIN, 1)


@onnxscript.script(_QAIC, default_opset=op)
def CtxScatter(data, slots, updates):
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    batch = op.Shape(data, start=0, end=1)
    heads = op.Shape(data, start=1, end=2)
    seq = op.Shape(slots, start=1, end=2)
    grid = op.Concat(batch, heads, seq, op.Constant(value_ints=[1]), axis=0)  # [B, H, S, 1]
    b_index = op.Unsqueeze(op.Range(zero, op.Squeeze(batch), one), op.Constant(value_ints=[1, 2, 3]))
    h_index = op.Unsqueeze(op.Range(zero, op.Squeeze(heads), one), op.Constant(value_ints=[0, 2, 3]))
    s_index = op.Unsqueeze(slots, op.Constant(value_ints=[1, 3]))
    indices = op.Concat(op.Expand(b_index, grid), op.Expand(h_index, grid), op.Expand(s_index, grid), axis=3)
    return op.ScatterND(data, indices, updates)


@onnxscript.script(_QAIC, default_opset=op)
def CtxScatterCB(data, batch_index, slots, updates):
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    batch = op.Shape(batch_index, start=0, end=1)
    heads = op.Shape(data, start=1, end=2)
    seq = op.Shape(slots, start=1, end=2)
    grid = op.Concat(batch, heads, seq, op.Constant(value_ints=[1]), axis=0)  # [B, H, S, 1]
    b_index = op.Unsqueeze(batch_index, op.Constant(value_ints=[2, 3]))
    h_index = op.Unsqueeze(op.Range(zero, op.Squeeze(heads), one), op.Constant(value_ints=[0, 2, 3]))
    s_index = op.Unsqueeze(slots, op.Constant(value_ints=[1, 3]))
    indices = op.Concat(op.Expand(b_index, grid), op.Expand(h_index, grid), op.Expand(s_index, grid), axis=3)
    return op.ScatterND(data, indices, updates)


@onnxscript.script(_QAIC, default_opset=op)
def CtxGather(data, ctx_indices, comp_ctx_len):
    grid = op.Concat(op.Shape(data, start=0, end=2), op.Reshape(comp_ctx_len, op.Constant(value_ints=[1])), axis=0)
    indices = op.Unsqueeze(op.Expand(ctx_indices, grid), op.Constant(value_ints=[-1]))  # [B, H, L, 1]
    return op.GatherND(data, indices, batch_dims=2)


@onnxscript.script(_QAIC, default_opset=op)
def CtxGatherCB(data, batch_index, ctx_indices, comp_ctx_len):
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    batch = op.Shape(batch_index, start=0, end=1)
    heads = op.Shape(data, start=1, end=2)
    length = op.Shape(ctx_indices, start=2, end=3)
    grid = op.Concat(batch, heads, length, op.Constant(value_ints=[1]), axis=0)  # [B, H, L, 1]
    b_index = op.Unsqueeze(batch_index, op.Constant(value_ints=[2, 3]))
    h_index = op.Unsqueeze(op.Range(zero, op.Squeeze(heads), one), op.Constant(value_ints=[0, 2, 3]))
    c_index = op.Unsqueeze(ctx_indices, op.Constant(value_ints=[3]))
    indices = op.Concat(op.Expand(b_index, grid), op.Expand(h_index, grid), op.Expand(c_index, grid), axis=3)
    return op.GatherND(data, indices)


def ctx_scatter_function() -> ir.Function:
    """A fresh copy of CtxScatter (attach it with ``qgraph.custom_ops.attach_function``)."""
    return function_from_script(CtxScatter)


def ctx_scatter_cb_function() -> ir.Function:
    return function_from_script(CtxScatterCB)


def ctx_gather_function() -> ir.Function:
    return function_from_script(CtxGather)


def ctx_gather_cb_function() -> ir.Function:
    return function_from_script(CtxGatherCB)

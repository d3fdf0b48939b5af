"""``com.qualcomm.cloud::CtxScatter``: the device's write of new K/V into a retained cache.

The Cloud AI 100 compiler recognizes this op and updates the retained state
in place; onnxruntime runs its function body, a ScatterND, so a graph that
uses it can still be checked against the no-cache graph. The body only uses
ops that exist from opset 13 to 23 (Unsqueeze and Squeeze with axes as
inputs), because the qaic preset lowers the default opset to 17 after the
KV-cache pass has attached it.

Semantics: ``CtxScatter(data [B, H, C, D], slots [B, S], updates [B, H, S, D])``
writes ``updates[b, h, s]`` into ``data[b, h, slots[b, s]]`` and returns the
result; every head of a row shares the row's slots.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript
from onnxscript import opset17 as op
from onnxscript.values import Opset

from qgraph.custom_ops import function_from_script

__all__ = ["CTX_SCATTER_DOMAIN", "ctx_scatter_function"]

CTX_SCATTER_DOMAIN = "com.qualcomm.cloud"
_QAIC = Opset(CTX_SCATTER_DOMAIN, 1)


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


def ctx_scatter_function() -> ir.Function:
    """A fresh copy of the function (attach it with ``qgraph.custom_ops.attach_function``)."""
    return function_from_script(CtxScatter)

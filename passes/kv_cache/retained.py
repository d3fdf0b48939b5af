"""The retained (device) form: caches written at ``position_ids`` and read up to a compute-context length.

One graph serves every compiled shape, as QEfficient's export does:

* ``ctx_len`` is a symbolic dim of ``past_key.{i}`` ([batch, n_kv, ctx_len,
  head_dim]); every length the graph needs is read from the cache's shape,
  so the device compiles the same graph at several context lengths;
* with **continuous batching** the cache has ``full_batch_size`` rows and
  the ``batch_index`` input [batch_size, 1] says which row each running
  sequence owns; writes and reads go through that row
  (``CtxScatterCB``/``CtxGatherCB`` on the device);
* with **compute-context lengths** the ``comp_ctx_lengths`` input (only its
  length is used) bounds what attention reads: the first ``ccl`` slots, so a
  short context costs a short attention.

**Padding is never written.** A padding token (position -1) targets the
cache's last slot with that slot's own current content, so the retained
state after a padded prefill is the state after the same prompt unpadded,
bit for bit -- the row's other sequences' slots included. (QEfficient marks
such writes with INT32_MAX indices, which the device drops and onnxruntime
rejects; here every index exists.) A valid token at the last slot in the
same chunk as padding would meet that write, so a sequence still holds at
most ``ctx_len - 1`` tokens (docs/design.md's retained contract).

The cache reads (``past_*`` through a Slice of its last slot) all feed the
write of the same cache, so a runtime may bind ``past_*`` and its
``_RetainedState`` to one buffer (:mod:`qgraph.runtime.engines`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from qgraph_passes.kv_cache.analysis import Layer
from qgraph_passes.kv_cache.build import GraphBuilder
from qgraph_passes.kv_cache.ctx_ops import (
    CTX_DOMAIN,
    ctx_gather_cb_function,
    ctx_gather_function,
    ctx_scatter_cb_function,
    ctx_scatter_function,
)
from qgraph_passes.kv_cache.probe import MaskMeaning

from qgraph.custom_ops import attach_function

__all__ = ["RetainedForm", "write_retained"]


@dataclasses.dataclass(frozen=True)
class RetainedForm:
    """Which variant of the retained form to build."""

    device_ops: bool  # com.qualcomm.cloud::CtxScatter/CtxGather (else ScatterND, Gather, Slice)
    continuous_batching: bool  # batch_index input, cache rows = full_batch_size
    compute_context: bool  # comp_ctx_lengths input bounds the slots attention reads

    @property
    def cache_batch(self) -> str:
        return "full_batch_size" if self.continuous_batching else "batch_size"


class _Shared:
    """The values every layer's write and read share, made once per graph."""

    def __init__(self, b: GraphBuilder, graph: ir.Graph, positions: ir.Value, first_past: ir.Value,
                 form: RetainedForm) -> None:
        self.b, self.form = b, form
        self.positions = positions
        self.ctx = b.dim(first_past, 2)  # [1]: the compiled ctx_len
        self.last_slot = b.op("Sub", self.ctx, b.const([1]), name=b.fresh("last_slot"))
        is_pad = b.op("Less", positions, b.const(0))
        self.pad = b.op("Unsqueeze", is_pad, b.const([1, 3]), name=b.fresh("padding"))  # [B, 1, S, 1]
        self.slots = b.op("Where", is_pad, self.last_slot, positions, name=b.fresh("slots"))
        self.batch_index = self.rows = None
        if form.compute_context:
            ccl = ir.Value(name="comp_ctx_lengths", type=ir.TensorType(ir.DataType.INT64),
                           shape=ir.Shape(["comp_ctx_lengths"]))
            graph.inputs.append(ccl)
            self.length = b.dim(ccl, 0)
        else:
            self.length = self.ctx
        if form.continuous_batching:
            self.batch_index = ir.Value(name="batch_index", type=ir.TensorType(ir.DataType.INT64),
                                        shape=ir.Shape(["batch_size", 1]))
            graph.inputs.append(self.batch_index)
            self.rows = b.op("Reshape", self.batch_index, b.const([-1]), name=b.fresh("cache_rows"))  # [B]
        self._slot_range: ir.Value | None = None
        self._ctx_indices: ir.Value | None = None
        self._scatter_indices: dict[int, ir.Value] = {}
        self._visibility: dict[MaskMeaning, ir.Value] = {}

    def slot_range(self) -> ir.Value:
        """[L]: 0 .. L - 1, the slots attention reads."""
        if self._slot_range is None:
            b = self.b
            self._slot_range = b.op("Range", b.const(0), b.op("Squeeze", self.length, b.const([0])), b.const(1),
                                    name=b.fresh("read_slots"))
        return self._slot_range

    def ctx_indices(self) -> ir.Value:
        """[B, 1, L]: the slots CtxGather reads, those past the row's last position pointed at slot 0.

        QEfficient gives those an invalid index the device skips; slot 0
        exists, and the mask hides whatever it holds from those queries.
        """
        if self._ctx_indices is None:
            b = self.b
            wanted = b.op("Unsqueeze", self.slot_range(), b.const([0, 1]))  # [1, 1, L]
            limit = b.op("Unsqueeze", b.op("ReduceMax", self.positions, b.const([1]), keepdims=1), b.const([2]))
            self._ctx_indices = b.op("Where", b.op("Greater", wanted, limit), b.const(0), wanted,
                                     name=b.fresh("ctx_indices"))
        return self._ctx_indices

    def scatter_indices(self, heads: int) -> ir.Value:
        """ScatterND indices [B, heads, S, 3] = (cache row, h, slot) for the ScatterND spelling."""
        if heads not in self._scatter_indices:
            b = self.b
            batch, seq = b.dim(self.slots, 0), b.dim(self.slots, 1)
            grid = b.op("Concat", batch, b.const([heads]), seq, axis=0)
            if self.rows is not None:
                rows = b.op("Reshape", self.rows, b.const([-1, 1, 1]))
            else:
                rows = b.op("Reshape", b.op("Range", b.const(0), b.scalar_dim(self.slots, 0), b.const(1)),
                            b.const([-1, 1, 1]))
            h_index = b.const(np.arange(heads).reshape(1, heads, 1), hint="heads")
            s_index = b.op("Unsqueeze", self.slots, b.const([1]))
            parts = [b.op("Unsqueeze", b.op("Expand", x, grid), b.const([-1])) for x in (rows, h_index, s_index)]
            self._scatter_indices[heads] = b.op("Concat", *parts, axis=-1, name=b.fresh("scatter_indices"))
        return self._scatter_indices[heads]

    def visibility(self, layer: Layer) -> ir.Value:
        """bool [B, 1, S, L] (float with an ALiBi bias): slot c visible to position p iff c <= p (and p - c < window).

        A padding query (p = -1) is treated as position 0: it sees slot 0
        and so never has an all-masked row, whose softmax is 0/0 in
        runtimes that do not special-case it; its output is never used.
        """
        meaning = layer.meaning
        if meaning not in self._visibility:
            b = self.b
            query = b.op("Unsqueeze", b.op("Max", self.positions, b.const(0)), b.const([1, 3]))  # [B, 1, S, 1]
            slots = b.op("Unsqueeze", self.slot_range(), b.const([0, 1, 2]))  # [1, 1, 1, L]
            visible = b.op("LessOrEqual", slots, query)
            if meaning.window is not None:
                recent = b.op("Greater", slots, b.op("Sub", query, b.const(meaning.window)))
                visible = b.op("And", visible, recent)
            visible.shape = ir.Shape([self.positions.shape[0], 1, self.positions.shape[1], self.length_dim])
            if meaning.slopes is not None:  # slot c holds the token at position c
                visible = b.key_position_bias(visible, slots, meaning.slopes, layer.dtype)
            self._visibility[meaning] = visible
        return self._visibility[meaning]

    @property
    def length_dim(self) -> str:
        return "comp_ctx_lengths" if self.form.compute_context else "ctx_len"

    # --- per layer -----------------------------------------------------------------

    def write(self, past: ir.Value, new: ir.Value, heads: int, name: str) -> ir.Value:
        """The cache after the chunk's writes; padding rewrites the last slot with its own content."""
        b = self.b
        kept = b.op("Slice", past, self.last_slot, self.ctx, b.const([2]))  # [F, H, 1, D]
        if self.rows is not None:
            kept = b.op("Gather", kept, self.rows, axis=0)  # [B, H, 1, D]
        updates = b.op("Where", self.pad, kept, new)
        if self.form.device_ops:
            if self.rows is not None:
                return b.op("CtxScatterCB", past, self.batch_index, self.slots, updates, domain=CTX_DOMAIN,
                            name=name, rule="retained-write")
            return b.op("CtxScatter", past, self.slots, updates, domain=CTX_DOMAIN, name=name, rule="retained-write")
        return b.op("ScatterND", past, self.scatter_indices(heads), updates, name=name, rule="retained-write")

    def read(self, state: ir.Value) -> ir.Value:
        """What attention reads of the written cache: this chunk's rows, the first L slots."""
        b = self.b
        if self.form.device_ops:
            if self.rows is not None:
                return b.op("CtxGatherCB", state, self.batch_index, self.ctx_indices(), self.length,
                            domain=CTX_DOMAIN, rule="retained-read")
            return b.op("CtxGather", state, self.ctx_indices(), self.length, domain=CTX_DOMAIN, rule="retained-read")
        read = state
        if self.rows is not None:
            read = b.op("Gather", read, self.rows, axis=0, rule="retained-read")
        if self.form.compute_context:
            read = b.op("Slice", read, b.const([0]), self.length, b.const([2]), rule="retained-read")
        return read


def write_retained(model: ir.Model, b: GraphBuilder, layers: list[Layer], positions: ir.Value,
                   form: RetainedForm, replace_attention) -> None:
    """Give every layer its retained cache: inputs, written outputs, and an Attention over what it reads.

    ``replace_attention(layer, key, value, mask)`` swaps the layer's
    Attention node for one over the given K, V and mask.
    """
    graph = model.graph
    if form.device_ops:
        for function in ((ctx_scatter_cb_function(), ctx_gather_cb_function()) if form.continuous_batching
                         else (ctx_scatter_function(), ctx_gather_function())):
            attach_function(model, function)
    pasts = []
    for layer in layers:
        cache_shape = ir.Shape([form.cache_batch, layer.kv_heads, "ctx_len", layer.head_dim])
        for kind in ("key", "value"):
            past = ir.Value(name=f"past_{kind}.{layer.index}", type=ir.TensorType(layer.dtype), shape=cache_shape)
            graph.inputs.append(past)
            pasts.append(past)
    shared = _Shared(b, graph, positions, pasts[0], form)
    read_shape = [positions.shape[0], None, shared.length_dim, None]
    for layer, (past_key, past_value) in zip(layers, zip(pasts[::2], pasts[1::2])):
        read = []
        for past, new in ((past_key, layer.key), (past_value, layer.value)):
            state = shared.write(past, new, layer.kv_heads, f"{past.name}_RetainedState")
            state.type, state.shape = past.type, past.shape
            graph.outputs.append(state)
            seen = shared.read(state)
            if seen is not state:
                seen.type = past.type
                seen.shape = ir.Shape([read_shape[0], layer.kv_heads, read_shape[2], layer.head_dim])
            read.append(seen)
        replace_attention(layer, read[0], read[1], shared.visibility(layer))

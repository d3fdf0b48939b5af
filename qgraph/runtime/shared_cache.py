"""A concat-contract graph whose cache lives in one buffer per layer: past and present are the same OrtValue.

onnxruntime's ``com.microsoft::GroupQueryAttention`` (what ``lower-gqa``
emits) recognizes a ``present`` output bound to the very OrtValue bound as
its ``past`` input: it then writes the step's new keys and values in place
at their positions and returns the buffer, instead of allocating
``past + new`` and copying the past into it (onnxruntime-genai's
``past_present_share_buffer``). A decode step then costs no copy of the
cache at all; the concat engine copies the whole cache every step (about
94 MB a step at 2048 tokens for SmolLM2-135M).

The buffers are ``[batch, kv_heads, capacity, head_dim]``, allocated when a
generation starts and doubled (content copied once) when a row outgrows
them, so a short generation does not pay for the graph's longest context.
Every binding except ``input_ids``, ``attention_mask`` and ``position_ids``
stays fixed between steps (a decode step's logits go to one buffer too).

It applies only where it is exact (:func:`shares_buffers`): every reader of a
``past_key_values.*`` input is a GroupQueryAttention that also writes the
matching ``present.*`` output. Rows are padded as the concat contract pads
them (every row has a slot for every column, the mask says which are
valid): a graph lowered with ``lower-gqa mask=bias`` reads the mask as its
attention bias, so any batch works; one lowered with ``mask=none`` declares
batch 1 and all-ones masks (metadata ``qgraph.kv.masks``), and padding is
refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.errors import BadInputError
from qgraph.runtime.engines import ConcatEngine, Engine, _hf_positions
from qgraph.verify.kv_contract import KVLayout

__all__ = ["SharedCacheEngine", "shares_buffers"]

_FIRST_CAPACITY = 256


def shares_buffers(model: ir.Model, layout: KVLayout) -> bool:
    """Whether ``past_key_values.*`` and ``present.*`` may be one buffer (see the module docstring)."""
    if layout.style != "concat":
        return False
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    for past_pair, present_pair in zip(layout.past, layout.present, strict=True):
        for slot, (past, present) in enumerate(zip(past_pair, present_pair, strict=True)):
            readers = inputs[past].consumers()
            if len(readers) != 1:
                return False
            node = readers[0]
            if (node.domain, node.op_type) != ("com.microsoft", "GroupQueryAttention"):
                return False
            if node.inputs[3 + slot] is not inputs[past] or node.outputs[1 + slot] is not outputs[present]:
                return False
    return True


class SharedCacheEngine(ConcatEngine):
    """Concat-contract graph, past and present bound to one growing buffer per cache tensor."""

    kind = "shared-buffer KV cache"

    def __init__(self, session: ort.InferenceSession, layout: KVLayout, *, label: str, n_kv_heads: int,
                 head_dim: int, max_tokens: int | None = None, first_capacity: int = _FIRST_CAPACITY) -> None:
        super().__init__(session, layout, label=label, n_kv_heads=n_kv_heads, head_dim=head_dim, max_tokens=max_tokens)
        self.fixed_batch = layout.batch  # 1 for a graph lowered with mask=none
        self.first_capacity = first_capacity
        self.capacity = 0
        self._buffers: dict[str, ort.OrtValue] = {}
        self._decode_logits: ort.OrtValue | None = None
        self._decode_logits_array = np.zeros(0, np.float32)
        # One-column steps write their token and position into these arrays, which stay bound (see _run_one).
        self._one_ids = np.zeros((0, 1), layout.ids_dtype)
        self._one_positions = np.zeros((0, 1), np.int64 if layout.positions_dtype is None else layout.positions_dtype)
        self._one_bound = False

    def start(self, batch: int) -> None:
        """A new generation. Buffers of the same batch are kept: every slot below the mask's length is
        written again before it is read (GroupQueryAttention reads no slot past total_sequence_length),
        so a generation pays no allocation (~1.5 ms of SmolLM2's 30 ms prefill) but the first."""
        Engine.start(self, batch)  # not ConcatEngine's: its empty past values are never bound here
        self._mask = np.zeros((batch, 0), np.int64)
        self._past = {}
        if self._buffers and next(iter(self._buffers.values())).shape()[0] != batch:
            self._buffers, self.capacity = {}, 0
            self._decode_logits = None
        self._binding = self.session.io_binding()
        self._binding.bind_output("logits", "cpu")  # bound first: get_outputs()[0]
        self._one_bound = False
        for pair_in, pair_out in zip(self.layout.past, self.layout.present, strict=True):
            for past, present in zip(pair_in, pair_out, strict=True):
                if past in self._buffers:
                    self._binding.bind_ortvalue_input(past, self._buffers[past])
                    self._binding.bind_ortvalue_output(present, self._buffers[past])

    def _grow(self, needed: int) -> None:
        """Buffers of at least ``needed`` positions, keeping what the old ones hold; rebinds them."""
        if needed <= self.capacity:
            return
        capacity = max(self.first_capacity, self.capacity)
        while capacity < needed:
            capacity *= 2
        if self.max_tokens is not None:
            capacity = max(needed, min(capacity, self.max_tokens))
        shape = (len(self._seen), self.n_kv_heads, capacity, self.head_dim)
        b = self._binding
        for pair_in, pair_out in zip(self.layout.past, self.layout.present, strict=True):
            for past, present in zip(pair_in, pair_out, strict=True):
                array = np.zeros(shape, self.layout.cache_dtype)
                if past in self._buffers:
                    array[:, :, : self.capacity] = self._buffers[past].numpy()
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self._buffers[past] = value
                b.bind_ortvalue_input(past, value)
                b.bind_ortvalue_output(present, value)
        self.capacity = capacity

    def _run(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.layout.masks_all_ones and not valid.all():
            raise BadInputError(f"{self.label} computes unpadded rows only (metadata qgraph.kv.masks=all-ones)")
        past = self._mask.shape[1]  # cache slots so far: every column, padding included (concat contract)
        width = tokens.shape[1]
        if self.max_tokens is not None and past + width > self.max_tokens:
            raise BadInputError(f"{self.label} holds at most {self.max_tokens} positions; this step needs {past + width}")
        if width == 1 and self.layout.vocab is not None and self.layout.cache_dtype == np.float32:
            return self._run_one(tokens[:, 0], valid[:, 0], past)
        self._positions(valid)
        self._mask = np.concatenate([self._mask, valid.astype(self._mask.dtype)], axis=1)
        self._grow(past + width)
        b = self._binding
        b.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, self.layout.ids_dtype))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(self._mask, self.layout.mask_dtype))
        if self.layout.has_position_ids:
            positions = _hf_positions(self._mask)[:, -width:]
            b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, self.layout.positions_dtype))
        b.bind_output("logits", "cpu")  # a prompt chunk's logits: onnxruntime allocates them
        self._one_bound = False
        self.session.run_with_iobinding(b)
        self.runs += 1
        return b.get_outputs()[0].numpy()

    def _run_one(self, tokens: np.ndarray, valid: np.ndarray, past: int) -> np.ndarray:
        """One column (every decode step): the step a generation repeats, so it does the least Python work.

        Its token ids, positions and logits live in arrays bound once (onnxruntime reads and writes a
        numpy array's memory through ``ortvalue_from_numpy``, no copy), and its positions come from the
        count of valid tokens (Hugging Face's ``cumsum(mask) - 1`` at the new column, 1 on padding)
        instead of a cumsum over the whole mask; only the grown mask is bound again. Python work between
        two runs is time the kernels do not get: on one session, SmolLM2-135M's int4 graph decoded 1.04x
        as fast this way as binding every input of every step (benchmarks/RESULTS.md, "ort vs
        onnxruntime-genai").
        """
        batch = len(self._seen)
        b = self._binding
        if not self._one_bound:  # the first one-column step of a generation, or the first after a wider one
            if self._one_ids.shape[0] != batch or self._decode_logits is None:
                self._one_ids = np.zeros((batch, 1), self.layout.ids_dtype)
                self._one_positions = np.zeros((batch, 1), self._one_positions.dtype)
                # onnxruntime writes into this array's memory, so a step reads its logits without
                # get_outputs wrapping every bound output (~0.2 ms).
                self._decode_logits_array = np.zeros((batch, 1, self.layout.vocab), np.float32)
                self._decode_logits = ort.OrtValue.ortvalue_from_numpy(self._decode_logits_array)
            b.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self._one_ids))
            if self.layout.has_position_ids:
                b.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(self._one_positions))
            b.bind_ortvalue_output("logits", self._decode_logits)
            self._one_bound = True
        self._one_ids[:, 0] = tokens
        self._one_positions[:, 0] = np.where(valid, self._seen, 1)
        self._seen = self._seen + valid
        self._mask = np.concatenate([self._mask, valid[:, None].astype(self._mask.dtype)], axis=1)
        self._grow(past + 1)
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(self._mask, self.layout.mask_dtype))
        self.session.run_with_iobinding(b)
        self.runs += 1
        return self._decode_logits_array.copy()  # the next step overwrites the buffer

    def cache_array(self, name: str) -> np.ndarray:
        """The valid part of one cache buffer (for tests and debugging)."""
        return self._buffers[name].numpy()[:, :, : self._mask.shape[1]]

    def describe(self) -> str:
        return f"{self.kind} ({self.layout.n_layers} layers, buffers of {self.capacity or self.first_capacity} positions)"

"""How many heads a cached layer's 4-D q, k and v carry, read by running the graph.

A standard ``Attention`` on 4-D ``[B, H, S, D]`` operands takes its head
counts from the operands at run time; its attributes do not say them.
The dynamo exporter's graphs mostly carry the shapes, but a TorchScript
export leaves q's shape unknown (``[unk, unk, unk, unk]``) even after shape
inference, and a layer with grouped KV heads (4 query heads, 2 KV heads)
looks the same as one without until it runs. ``lower-mha`` must know,
because ``com.microsoft::MultiHeadAttention`` takes one ``num_heads`` for
q, k and v.

So the operands are computed -- all layers' in one onnxruntime session --
on two steps of a batch-1 generation with an all-ones mask (a prefill, and
a chunk after a past, of different lengths) and their dims 1 and 3 read. A
layout is accepted only where both steps agree: heads do not depend on the
input, and a graph whose operands did would be refused here, not guessed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from qgraph_passes.kv_cache.probe import ProbeError, run_slice

__all__ = ["HeadLayout", "probe_head_layouts"]


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Heads and head size of q, k and v (each ``[B, heads, S, size]``)."""

    q_heads: int
    k_heads: int
    v_heads: int
    q_size: int
    k_size: int
    v_size: int


_PAST_PREFIX = "past_key_values."


def _step_feeds(model: ir.Model, past: int, seq: int) -> dict[str, np.ndarray]:
    """Batch-1 feeds of a concat-cache step of ``seq`` tokens after ``past`` ones, mask all ones."""
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        name = value.name or ""
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        if name == "input_ids":
            feeds[name] = np.ones((1, seq), dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + seq), dtype)
        elif name == "position_ids":
            feeds[name] = (past + np.arange(seq))[None].astype(dtype)
        elif name.startswith(_PAST_PREFIX) and value.shape is not None and len(value.shape) == 4:
            dims = [d if isinstance(d, int) else 1 for d in value.shape]
            dims[0], dims[2] = 1, past
            feeds[name] = np.zeros(dims, dtype)
    return feeds


def probe_head_layouts(model: ir.Model, operands: dict[ir.Node, tuple[ir.Value, ir.Value, ir.Value]]
                       ) -> dict[ir.Node, HeadLayout] | str:
    """The head layout of each Attention's 4-D (q, k, v), or why they could not be read."""
    values = [v for qkv in operands.values() for v in qkv]
    if not values:
        return {}
    try:
        steps = run_slice(model, values, [_step_feeds(model, 0, 5), _step_feeds(model, 3, 2)])
    except ProbeError as error:
        return f"the attention operands could not be probed: {error}"
    layouts: dict[ir.Node, HeadLayout] = {}
    for i, node in enumerate(operands):
        shapes = [[steps[s][3 * i + j].shape for j in range(3)] for s in range(2)]
        if any(len(shape) != 4 for step in shapes for shape in step):
            return f"Attention '{node.name}': its operands are not 4-D when run ({shapes[0]})"
        dims = [tuple((shape[1], shape[3]) for shape in step) for step in shapes]
        if dims[0] != dims[1]:
            return f"Attention '{node.name}': the operands' heads change with the input ({shapes[0]} vs {shapes[1]})"
        (qh, qd), (kh, kd), (vh, vd) = dims[0]
        layouts[node] = HeadLayout(int(qh), int(kh), int(vh), int(qd), int(kd), int(vd))
    return layouts

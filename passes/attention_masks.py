"""The mask input of a fused Attention: what onnxruntime needs so padding means the same.

Found with onnxruntime 1.32 (CPU) on opset-23 ``Attention`` with 4-D inputs:

* the mask's second-to-last dim must equal Q's sequence length: a padding
  mask shaped [B, 1, 1, T] is rejected at run time ("inconsistent
  q_sequence_length"), so such a mask is expanded to [.., S, T] first;
* a row whose scores are all ``-inf`` (boolean False, or additive ``-inf``)
  comes out as zeros -- the value torch's ``_safe_softmax`` (the exporters'
  Softmax + IsNaN/Where guard) gives, where an unguarded Softmax gives NaN;
* a row whose additive mask is exactly the dtype's lowest value (what
  eager attention fills with, ``torch.finfo(dtype).min``) also comes out as
  zeros, while the original Softmax averages V uniformly over it. Any
  finite fill above the lowest value averages uniformly in both. So a
  finite fill is clamped to half the lowest value, which leaves every
  partially masked row unchanged (its masked scores still underflow to 0).

Masks are shared by every layer; the nodes made for one are stamped and
reused by the next core that reads the same mask.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["MASK_KEY", "fill_needs_clamp", "safe_fill"]

MASK_KEY = "qgraph.attention.mask"


def safe_fill(fill: float, dtype: np.dtype) -> float:
    """A masking value with the same meaning in onnxruntime's Attention as in Softmax."""
    lowest = float(np.finfo(dtype).min)
    if np.isneginf(fill) or fill > lowest / 2:
        return fill
    return lowest / 2


def fill_needs_clamp(fill: float, dtype: np.dtype) -> bool:
    return safe_fill(fill, dtype) != fill


def reuse(mask: ir.Value, kind: str) -> ir.Value | None:
    """A value made earlier from ``mask`` for the same purpose, if there is one."""
    for user in mask.consumers():
        if user.metadata_props.get(MASK_KEY) == kind and user.graph is not None:
            return user.outputs[0]
    return None


def stamp(value: ir.Value, kind: str) -> ir.Value:
    node = value.producer()
    if node is not None:
        node.metadata_props[MASK_KEY] = kind
    return value

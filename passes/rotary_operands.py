"""What every rotary rule requires of the rotated value: a 4-D float tensor with a known, even head size.

Shared by the half-rotation and interleaved rules (``rotary``,
``rotary_interleaved``), with the helper that moves the heads in front for
RotaryEmbedding's 4-D ``[B, H, S, D]`` input.
"""

from __future__ import annotations

import onnx_ir as ir
from qgraph_passes.shape_values import static_dim

__all__ = ["head_size", "heads_first", "same_dim"]

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def head_size(x: ir.Value) -> int | str:
    """x's head size D (its last dim) if x is a 4-D float tensor and D a known even number, else why not."""
    if x.dtype not in _FLOATS:
        return f"'{x.name}' is {x.dtype}, not float32/float16/bfloat16"
    if x.shape is None or len(x.shape) != 4:
        return f"'{x.name}' is not known to be 4-D [B, H, S, D]"
    # static_dim: TorchScript's heads reshape leaves the head size symbolic in the stored shape
    d = static_dim(x, 3)
    if not isinstance(d, int) or d % 2:
        return f"the head size of '{x.name}' is {x.shape[3] if d is None else d}, not a known even number"
    return d


def same_dim(a, b) -> bool:
    """Whether two dims are known to be equal: the same number, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def heads_first(op, x):
    """[B, S, H, D] <-> [B, H, S, D] (its own inverse), typed: inference does not run on replacement values."""
    moved = op.Transpose(x, perm=[0, 2, 1, 3])
    if x.shape is not None:
        moved.shape = ir.Shape([x.shape[0], x.shape[2], x.shape[1], x.shape[3]])
    return moved

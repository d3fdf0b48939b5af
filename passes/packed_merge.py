"""When a merge of Attention's heads can read the packed output as it is: ``Reshape(y3, t)`` for ``Reshape(merge, t)``.

attention-io replaces ``Reshape(Transpose(y, [0, 2, 1, 3]), t)`` by the
packed Attention's output y3 when t is proven to be ``[B, S, H * D]``.
Where t is computed at run time from something not proven (the dynamo
exporter merges GPT-Neo's heads into ``[B, Min(128, S), 64]``, a guard of
the model's position table written into the target), the Reshape can stay
after the packed Attention instead:

* y3 (``[B, S, H * Dv]``) holds the elements of ``Transpose(y)``
  (``[B, S, H, Dv]``) in the same row-major order, and as many (the ONNX
  Attention op's 3-D output is that transpose merged).
* A Reshape's output depends only on that order, that count and t -- and,
  for an entry 0 under ``allowzero = 0``, on its input's dim at that axis.
  The two inputs share dims 0 and 1 and differ from axis 2 on.

So ``Reshape(y3, t) == Reshape(Transpose(y), t)`` for every input when
``allowzero`` is 1 or no entry of t from index 2 on can be 0 (each proven a
non-zero number); a -1 is then inferred from the same count and the same
other entries. Anything else is refused with the entry that was not proven.
"""

from __future__ import annotations

import onnx_ir as ir
from qgraph_passes.dim_sources import Const, DimSources

__all__ = ["packed_merge_reason"]


def packed_merge_reason(graph: ir.Graph, target: ir.Value, allowzero: int) -> str | None:
    """Why ``Reshape(y3, target)`` may differ from ``Reshape(Transpose(y), target)``, or None when it cannot."""
    if allowzero:
        return None
    entries = _entries(DimSources(graph), target)
    if entries is None:
        return f"the entries of its target '{target.name}' are not known (an entry 0 from index 2 on would copy a dim)"
    for index, entry in enumerate(entries[2:], start=2):
        if not isinstance(entry, Const) or entry == 0:
            return f"entry {index} of its target '{target.name}' is not proven a non-zero number (a 0 copies a dim)"
    return None


def _entries(dims: DimSources, target: ir.Value) -> list | None:
    """The target's entries, each None if unknown: a Concat of pieces of static lengths is known piece by piece
    (GPT-Neo's ``Concat(B, Min(128, S), 64)``: the Min is not followed, the 64 after it is still a number)."""
    entries = dims.entries(target)
    node = target.producer()
    if entries is not None or node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return entries
    out: list = []
    for piece in node.inputs:
        got = dims.entries(piece)
        if got is None:
            if piece is None or piece.shape is None or len(piece.shape) != 1 or not isinstance(piece.shape[0], int):
                return None
            got = [None] * piece.shape[0]
        out.extend(got)
    return out

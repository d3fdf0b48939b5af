"""Sibling projections packed: MatMuls of one input by constant weights become one MatMul and a Split.

An attention block projects its normalized input three times (Q, K, V) and
a gated MLP twice (gate, up)::

    (x @ Wq, x @ Wk, x @ Wv)  ->  Split(x @ [Wq | Wk | Wv], [Nq, Nk, Nv], axis=-1)
    (x @ Wg, x @ Wu)          ->  Split(x @ [Wg | Wu], [Ng, Nu], axis=-1)

Column j of ``x @ [A | B]`` is the dot product of a row of x with column j
of the packed weight, which is column j of A (or j - Na of B): the same sums
in the same order, so the outputs are bit-identical. onnxruntime then
launches one GEMM (or, after ``quantize``, one ``MatMulNBits``) instead of
two or three; at decode time, with one row of x, that overhead is what a
small model's projection costs.

The weights are matched by their header (``op.weight``: 2-D, one dtype,
the same K rows as x's last dim) and are not read while the passes run: the
packed weight is a lazy tensor, concatenated when the model is saved (or
when a later pass such as ``quantize`` reads it). Three siblings are packed
before two, so Q/K/V become one MatMul, not two. MatMuls with weights of
different dtypes or row counts are reported, with the check that failed.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir

from qgraph import RewritePass, Rule, RuleSet

__all__ = ["PackMatMulsPass", "RULES"]


def three_projections(op, x):
    return tuple(op.MatMul(x, op.weight(name, shape=("K", f"N{i}"))) for i, name in enumerate(("w0", "w1", "w2")))


def two_projections(op, x):
    return tuple(op.MatMul(x, op.weight(name, shape=("K", f"N{i}"))) for i, name in enumerate(("w0", "w1")))


def same_weight_dtype(x, w0, w1, w2=None) -> str | None:
    weights = [w for w in (w0, w1, w2) if w is not None]
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1 or x.dtype not in dtypes:
        return f"x is {x.dtype} and the weights are {sorted(map(str, dtypes))}: not one dtype"
    if x.shape is None or len(x.shape) < 2:
        return f"'{x.name}' is not known to have rank >= 2 (the Split runs over its last axis)"
    return None


# Rows of the packed weight written per block when it is saved.
_BLOCK_BYTES = 1 << 20


class PackedColumns(ir.LazyTensor):
    """``[A | B | C]`` of 2-D weights: concatenated when read, written to a file a block of rows at a time.

    Saving is where every packed weight is produced (a SmolLM2 export has 60,
    280 MB in all). Writing each from one reused buffer of ~1 MB spares
    allocating and faulting in a fresh array per weight; the bytes are the
    ones ``tobytes()`` gives.
    """

    def __init__(self, parts: list[ir.TensorProtocol]) -> None:
        self.parts = parts
        shape = ir.Shape([parts[0].shape[0], sum(t.shape[1] for t in parts)])
        super().__init__(self._concatenate, dtype=parts[0].dtype, shape=shape)

    def _concatenate(self) -> ir.Tensor:
        return ir.tensor(np.concatenate([t.numpy() for t in self.parts], axis=1))

    def tofile(self, file) -> None:  # noqa: ANN001 - a binary file object, as onnx_ir passes it
        arrays = [t.numpy() for t in self.parts]
        # Sub-byte types are packed two to a byte on disk but not in numpy; big-endian hosts swap.
        if self.dtype.bitwidth < 8 or sys.byteorder != "little" or any(a.dtype.hasobject for a in arrays):
            super().tofile(file)
            return
        rows, cols = self.shape[0], self.shape[1]
        step = max(1, _BLOCK_BYTES // max(1, cols * arrays[0].itemsize))
        buffer = np.empty((min(step, rows), cols), dtype=arrays[0].dtype)
        for start in range(0, rows, step):
            block = buffer[: min(step, rows - start)]
            np.concatenate([a[start : start + len(block)] for a in arrays], axis=1, out=block)
            file.write(block.view(np.uint8).data)


def _packed(weights: list[ir.Value]) -> ir.LazyTensor:
    """The column-wise concatenation, computed only when someone reads it."""
    return PackedColumns([w.const_value for w in weights])


def one_projection(op, x, w0, w1, w2=None):
    weights = [w for w in (w0, w1, w2) if w is not None]
    merged = op.MatMul(x, op.const(_packed(weights)))
    sizes = np.array([w.shape[1] for w in weights], dtype=np.int64)
    outputs = op.Split(merged, sizes, axis=-1, _outputs=len(weights))
    return tuple(outputs)


_EXAMPLE = {"x": (ir.DataType.FLOAT, ("B", "S", "K"))}
RULES = RuleSet(
    [
        Rule("pack-three-matmuls", three_projections, one_projection, same_weight_dtype,
             doc="(x@A, x@B, x@C) -> Split(x @ [A|B|C])", example_inputs=_EXAMPLE),
        Rule("pack-two-matmuls", two_projections, one_projection, same_weight_dtype,
             doc="(x@A, x@B) -> Split(x @ [A|B])", example_inputs=_EXAMPLE),
    ],
    name="pack-matmuls",
)


class PackMatMulsPass(RewritePass):
    """Pack sibling MatMuls of one input by constant weights (Q/K/V, gate/up) into one MatMul and a Split.

    The rule table is ``RULES``; the module docstring gives the algebra and
    why the weights are concatenated lazily.
    """

    name = "pack-matmuls"
    rules = RULES

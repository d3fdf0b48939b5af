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


def _packed(weights: list[ir.Value]) -> ir.LazyTensor:
    """The column-wise concatenation, computed only when someone reads it."""
    tensors = [w.const_value for w in weights]
    rows = tensors[0].shape[0]
    cols = sum(t.shape[1] for t in tensors)

    def concatenate() -> ir.Tensor:
        return ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=1))

    return ir.LazyTensor(concatenate, dtype=tensors[0].dtype, shape=ir.Shape([rows, cols]))


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

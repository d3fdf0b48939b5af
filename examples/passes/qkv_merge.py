"""Q/K/V merge: three projections of the same input -> one MatMul on the concatenated weight, then Split.

An attention block projects its input three times (``x @ Wq``, ``x @ Wk``,
``x @ Wv``); a device runs one wide MatMul faster than three narrow ones::

    (x @ Wq, x @ Wk, x @ Wv)  ->  Split(x @ concat(Wq, Wk, Wv, axis=1), [Q, K, V], axis=-1)

The weights are matched with ``op.weight``: by shape, at any size, without
being read; only the replacement reads them, to concatenate. The pattern
returns three values, so the rule replaces all three at once.

Try it (docs/writing-passes.md)::

    qgraph export tiny-llama -o llama
    qgraph verify-rules --plugin examples/passes/qkv_merge.py --rule qkv-merge
    qgraph optimize llama/model.onnx -o llama-qkv.onnx --plugin examples/passes/qkv_merge.py \
        --passes qkv-merge --verify
"""

import numpy as np

from qgraph import RewritePass, Rule, RuleSet


def three_projections(op, x):
    q = op.MatMul(x, op.weight("wq", shape=("H", "Q")))
    k = op.MatMul(x, op.weight("wk", shape=("H", "K")))
    v = op.MatMul(x, op.weight("wv", shape=("H", "V")))
    return q, k, v


def same_dtype(wq, wk, wv):
    dtypes = {w.const_value.dtype for w in (wq, wk, wv)}
    return None if len(dtypes) == 1 else f"the weights have different dtypes {sorted(map(str, dtypes))}"


def one_projection(op, x, wq, wk, wv):
    weights = [w.const_value.numpy() for w in (wq, wk, wv)]
    merged = op.MatMul(x, op.const(np.concatenate(weights, axis=1)))
    sizes = np.array([w.shape[1] for w in weights], dtype=np.int64)
    return op.Split(merged, sizes, axis=-1, _outputs=3)


RULES = RuleSet([Rule("qkv-merge", three_projections, one_projection, same_dtype,
                      doc="(x@Wq, x@Wk, x@Wv) -> Split(x @ [Wq|Wk|Wv])")])


class QKVMergePass(RewritePass):
    """Merge three MatMuls of one input by constant weights into one MatMul and a Split."""

    name = "qkv-merge"
    rules = RULES

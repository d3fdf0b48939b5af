"""The probes of the kv-cache analysis: weights a probe need not read, and why the others are kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper
from qgraph_passes.kv_cache.positions import TOKENS, dependencies
from qgraph_passes.kv_cache.probe import run_slice, zeroable_weights

BIG = 600  # [600, 600] float32: 1.4 MiB, above the 1 MiB a weight must exceed to be zeroed


def _graph() -> ir.Model:
    """A weight that meets token data, and a causal-mask buffer (as old exports keep one) the mask slices."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(BIG, BIG)).astype(np.float32), "token_table")
    buffer = numpy_helper.from_array(np.tril(np.ones((BIG, BIG), np.float32)), "causal_buffer")
    consts = [numpy_helper.from_array(np.asarray(v, np.int64), n)
              for n, v in (("zero", [0]), ("one", [1]), ("axes01", [0, 1]))]
    nodes = [
        oh.make_node("Gather", ["token_table", "input_ids"], ["hidden"]),  # token data: the table may be zeros
        oh.make_node("Shape", ["input_ids"], ["seq"], start=1, end=2),
        oh.make_node("Slice", ["causal_buffer", "zero", "seq", "zero"], ["rows"]),
        oh.make_node("Slice", ["rows", "zero", "seq", "one"], ["mask2d"]),  # the buffer's values matter
        oh.make_node("Unsqueeze", ["mask2d", "axes01"], ["mask"]),
        oh.make_node("ReduceSum", ["hidden"], ["logits"], keepdims=1),
    ]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"])],
                          [oh.make_tensor_value_info("logits", T.FLOAT, None),
                           oh.make_tensor_value_info("mask", T.FLOAT, None)], [table, buffer, *consts])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def test_only_weights_that_meet_token_data_are_zeroed_and_the_mask_is_unchanged() -> None:
    model = _graph()
    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    deps = dependencies(model.graph, ids, None)
    zeroed = zeroable_weights(model, lambda v: bool(deps.get(v, 0) & TOKENS))
    assert {v.name for v in zeroed} == {"token_table"}
    mask = next(o for o in model.graph.outputs if o.name == "mask")
    feeds = {"input_ids": np.zeros((2, 7), np.int64)}
    exact = run_slice(model, [mask], feeds)[0]
    assert np.array_equal(run_slice(model, [mask], feeds, zeroed=zeroed)[0], exact)
    assert np.array_equal(exact[0, 0], np.tril(np.ones((7, 7), np.float32)))
    # Zeroing the buffer the mask reads would change the mask: that is why it is kept.
    buffer = model.graph.initializers["causal_buffer"]
    assert not np.array_equal(run_slice(model, [mask], feeds, zeroed={buffer})[0], exact)

"""channel_probe: which element of the source each element of a moved (and negated) value holds, read by running."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from qgraph_passes.channel_probe import ChannelMap, channel_map, probe
from qgraph_passes.rotary_tables import repeated_pairs


def _model(nodes, inits, x_shape, out="y") -> dict[str, ir.Value]:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    model = ir.from_proto(proto)
    values = {v.name: v for n in model.graph for v in n.outputs}
    values["x"] = model.graph.inputs[0]
    return values


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data(), d=st.integers(2, 12))
def test_a_signed_permutation_of_the_channels_is_read_back_exactly(data, d):
    perm = data.draw(st.permutations(range(d)))
    negated = data.draw(st.lists(st.booleans(), min_size=d, max_size=d))
    plus = [j for j in range(d) if not negated[j]]
    minus = [j for j in range(d) if negated[j]]
    # y[..., j] = (-1 if negated[j]) * x[..., perm[j]], spelled as two gathers, a Neg, a Concat and a reorder
    inits = [numpy_helper.from_array(np.array([perm[j] for j in plus], np.int64), "plus"),
             numpy_helper.from_array(np.array([perm[j] for j in minus], np.int64), "minus"),
             numpy_helper.from_array(np.argsort(plus + minus).astype(np.int64), "order")]
    nodes = [helper.make_node("Gather", ["x", "plus"], ["kept"], axis=-1),
             helper.make_node("Gather", ["x", "minus"], ["taken"], axis=-1),
             helper.make_node("Neg", ["taken"], ["turned"]),
             helper.make_node("Concat", ["kept", "turned"], ["joined"], axis=-1),
             helper.make_node("Gather", ["joined", "order"], ["y"], axis=-1)]
    values = _model(nodes, inits, ["B", 2, "S", d])
    got = channel_map(values["x"], values["y"])
    assert got == ChannelMap(tuple(perm), tuple(-1 if n else 1 for n in negated))


def test_a_value_computed_by_arithmetic_is_refused_with_the_op_named():
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Mul", ["x", "two"], ["y"], name="scale")]
    values = _model(nodes, inits, ["B", 4])
    reason = channel_map(values["x"], values["y"])
    assert isinstance(reason, str) and "Mul 'scale'" in reason and "does more than move elements" in reason


def test_moving_elements_across_positions_is_not_a_channel_map():
    nodes = [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])]
    values = _model(nodes, [], [3, 3])
    assert "mixes elements across the leading axes" in channel_map(values["x"], values["y"])
    run = probe(values["x"], values["y"])
    np.testing.assert_array_equal(run.target, run.source.T)  # the probe itself shows where each element went


@settings(max_examples=15, deadline=None, derandomize=True)
@given(repeat=st.sampled_from(["tile", "expand", "concat", "halves"]), n=st.integers(1, 6))
def test_a_table_repeated_in_pairs_is_told_from_one_repeated_in_halves(repeat, n):
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    inits = [c("last", [-1]), c("reps", [1, 1, 2]), c("flat", [0, -1])]
    nodes = [helper.make_node("Cos", ["x"], ["cos"]), helper.make_node("Unsqueeze", ["cos", "last"], ["col"])]
    if repeat == "tile":
        nodes.append(helper.make_node("Tile", ["col", "reps"], ["pairs"]))
    elif repeat == "expand":
        nodes.append(helper.make_node("Expand", ["col", "reps"], ["pairs"]))
    else:
        nodes.append(helper.make_node("Concat", ["col", "col"] if repeat == "concat" else ["cos", "cos"], ["pairs"],
                                      axis=-1))
    nodes.append(helper.make_node("Reshape", ["pairs", "flat"], ["y"]))
    values = _model(nodes, inits, ["S", n])
    got = repeated_pairs(values["y"])
    if repeat == "halves" and n > 1:  # cat((t, t)): entry 2i is t[2i % n], not t[i]
        assert isinstance(got, str) and "does not repeat each entry" in got
    else:
        assert not isinstance(got, str), got
        assert got.probe_shape[-1] == 2 * n

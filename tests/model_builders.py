"""Tiny ONNX models for tests, built with ``onnx.helper``.

Every builder returns a fresh ``onnx.ModelProto`` (or, for the on-disk
builders, the path of the saved ``.onnx`` file) so a test can mutate what it
gets without affecting other tests. Weights are drawn from a seeded generator:
the same call always gives the same bytes, which lets tests compare values
across load/save round trips.

Convert to the IR with ``onnx_ir.serde.deserialize_model(proto)`` or
``qgraph.io.load(proto)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OPSET = 17
CUSTOM_DOMAIN = "com.example.qgraph"


def _weights(shape: tuple[int, ...], seed: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def mlp_model(
    *,
    in_features: int = 4,
    hidden: int = 8,
    out_features: int = 3,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> onnx.ModelProto:
    """``y = Relu(x @ W1 + b1) @ W2 + b2`` with a symbolic ``batch`` dimension.

    Inputs: ``x`` float [batch, in_features]; output ``y`` float
    [batch, out_features]. Initializers: W1, b1, W2, b2 (float32).
    """
    w1 = numpy_helper.from_array(_weights((in_features, hidden), seed), "W1")
    b1 = numpy_helper.from_array(_weights((hidden,), seed + 1), "b1")
    w2 = numpy_helper.from_array(_weights((hidden, out_features), seed + 2), "W2")
    b2 = numpy_helper.from_array(_weights((out_features,), seed + 3), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["y"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        [w1, b1, w2, b2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def model_with_function(*, opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """A graph that calls a model-local function ``com.example.qgraph::ScaledAdd``.

    ``y = ScaledAdd(x, W)`` where the function body computes ``(x + w) * 2``.
    Both the default domain and the custom domain are imported, as the ONNX
    spec requires for every domain a node uses.
    """
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    body = [
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Constant", [], ["c"], value=two),
        helper.make_node("Mul", ["s", "c"], ["out"]),
    ]
    function = helper.make_function(
        CUSTOM_DOMAIN,
        "ScaledAdd",
        ["a", "b"],
        ["out"],
        body,
        opset_imports=[helper.make_opsetid("", opset)],
    )
    w = numpy_helper.from_array(_weights((2, 3), seed), "W")
    graph = helper.make_graph(
        [helper.make_node("ScaledAdd", ["x", "W"], ["y"], domain=CUSTOM_DOMAIN, name="call")],
        "with_function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(CUSTOM_DOMAIN, 1)],
        functions=[function],
    )


def model_with_subgraph(*, opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """An ``If`` whose branches hold their own initializers and read ``x`` from outer scope.

    ``y = x + T`` if ``cond`` else ``x - E``; ``T`` and ``E`` are float [3]
    initializers inside the branch graphs, so subgraph handling is exercised.
    """
    then_init = numpy_helper.from_array(_weights((3,), seed), "T")
    else_init = numpy_helper.from_array(_weights((3,), seed + 1), "E")
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["x", "T"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [3])],
        [then_init],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["x", "E"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [3])],
        [else_init],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph, name="branch"
            )
        ],
        "with_subgraph",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def save_with_external_data(
    model: onnx.ModelProto,
    path: Path,
    *,
    location: str | None = None,
) -> Path:
    """Save ``model`` at ``path`` with every initializer in one external data file.

    The data file is ``location`` (default ``<file name>.data``) relative to
    the model's folder. Uses onnx's own writer, so the files look like what
    exporters produce rather than what qgraph writes.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())  # leave the caller's copy alone
    location = location or f"{path.name}.data"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def model_with_external_data(tmp_path: Path, name: str = "model.onnx") -> Path:
    """``mlp_model()`` saved in ``tmp_path`` with its weights in ``<name>.data``."""
    return save_with_external_data(mlp_model(), tmp_path / name)


def initializer_arrays(model: onnx.ModelProto, base_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Every initializer of the main graph as numpy, reading external data from ``base_dir``."""
    if base_dir is not None:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

"""Tiny models and the onnxruntime equivalence check used by the cleanup-pass tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def parse(text: str) -> ir.Model:
    """An IR model from onnx's textual syntax."""
    return ir.from_proto(onnx.parser.parse_model(text))


def proto_of(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def session(model: ir.Model | onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, str) else proto_of(model).SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: ir.Model | onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _elements(dtype: np.dtype) -> st.SearchStrategy:
    if dtype == np.bool_:
        return st.booleans()
    if np.issubdtype(dtype, np.floating):
        return st.floats(-8, 8, width=32, allow_subnormal=False)
    return st.integers(-5, 5)


@st.composite
def feeds_for(draw: st.DrawFn, model: onnx.ModelProto, max_dim: int = 5) -> dict[str, np.ndarray]:
    """Random inputs for a model: one drawn size per symbolic dim name."""
    initializers = {init.name for init in model.graph.initializer}
    sizes: dict[str, int] = {}
    feeds: dict[str, np.ndarray] = {}
    for value_info in model.graph.input:
        if value_info.name in initializers:
            continue
        tensor_type = value_info.type.tensor_type
        shape = []
        for i, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            else:
                key = dim.dim_param or f"{value_info.name}:{i}"
                if key not in sizes:
                    sizes[key] = draw(st.integers(1, max_dim))
                shape.append(sizes[key])
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        feeds[value_info.name] = draw(hnp.arrays(dtype, tuple(shape), elements=_elements(dtype)))
    return feeds


def assert_equivalent(
    before: ir.Model | onnx.ModelProto | str,
    after: ir.Model | onnx.ModelProto | str,
    *,
    examples: int = 15,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    data: st.DataObject | None = None,
) -> None:
    """Both models give the same outputs, by name, on hypothesis-drawn inputs.

    Inside a test that is itself ``@given``, pass its ``st.data()`` object so
    the inputs are drawn from it instead of a nested ``@given``.
    """
    s_before, s_after = session(before), session(after)
    names = [o.name for o in s_before.get_outputs()]
    assert [o.name for o in s_after.get_outputs()] == names, "output names changed"
    signature = before if isinstance(before, str) else proto_of(before)
    signature = onnx.load(signature, load_external_data=False) if isinstance(signature, str) else signature

    def compare(feeds: dict[str, np.ndarray]) -> None:
        expected = s_before.run(None, feeds)
        actual = s_after.run(None, feeds)
        for name, e, a in zip(names, expected, actual):
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"output {name!r}")

    if data is not None:
        for _ in range(examples):
            compare(data.draw(feeds_for(signature)))
        return

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(feeds=feeds_for(signature))
    def outputs_match(feeds: dict[str, np.ndarray]) -> None:
        compare(feeds)

    outputs_match()


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def all_op_types(model: ir.Model) -> list[str]:
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return [node.op_type for node in nodes]


def run_to_fixpoint(model: ir.Model, passes: list[Callable], max_iterations: int = 8) -> int:
    """Run passes in rounds until a round changes nothing; returns the rounds run."""
    for round_ in range(1, max_iterations + 1):
        changed = False
        for p in passes:
            changed |= p(model).modified
        if not changed:
            return round_
    raise AssertionError(f"no fixpoint after {max_iterations} rounds")

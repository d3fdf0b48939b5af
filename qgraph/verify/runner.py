"""Run an ``onnx_ir`` model in onnxruntime the way verification needs it.

* Graph optimizations are off (``ORT_DISABLE_ALL``): onnxruntime's own
  fusions and constant folding would otherwise rewrite both graphs into the
  same kernels and could hide exactly the mistake being looked for.
* Few intra-op threads (default 1): the inputs are small, thread start-up
  dominates, and two sessions run side by side on 2-core machines.
* Weights kept on disk stay on disk: a model whose initializers are
  ``ir.ExternalTensor`` is handed to onnxruntime as a proto that still
  refers to the external files, with onnxruntime told the folder they live
  in; only when they live in several folders, or an in-memory model is too
  big for one protobuf, is the model written to a temporary folder.
* Weights on disk are mapped once per process (:mod:`qgraph.verify.shared_weights`):
  every session handed the same bytes of the same file uses one memory map
  of them, and weight prepacking (a private copy of every MatMul weight per
  session) is off. A verification holds two sessions of one model -- and
  ``--verify`` a pair per pass -- so without this a 652 MB model peaked at
  several times its size.
* Tensors numpy has no type for in onnxruntime's binding (bfloat16, fp8) go
  in and out as raw ``OrtValue`` buffers reinterpreted with ml_dtypes.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.verify.shared_weights import share_external_weights

__all__ = ["OrtRunner", "RunError", "with_outputs"]

# Protobuf refuses messages over 2 GiB; stay clear of the limit.
_PROTO_LIMIT_BYTES = 1_800_000_000

_ORT_TYPE_TO_NUMPY: dict[str, np.dtype] = {
    "tensor(bfloat16)": np.dtype(ml_dtypes.bfloat16),
    "tensor(float8e4m3fn)": np.dtype(ml_dtypes.float8_e4m3fn),
    "tensor(float8e4m3fnuz)": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "tensor(float8e5m2)": np.dtype(ml_dtypes.float8_e5m2),
    "tensor(float8e5m2fnuz)": np.dtype(ml_dtypes.float8_e5m2fnuz),
}


_QUIET_RUN = ort.RunOptions()
_QUIET_RUN.log_severity_level = 4


class RunError(RuntimeError):
    """onnxruntime could not load or run a model; ``stage`` is "load" or "run"."""

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


def with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` that also outputs the named values.

    The copy shares tensors with ``model`` (``ir.Model.clone``), so weights
    are not duplicated, and the caller's model is untouched. Only used when
    the model has to be written to disk; otherwise the extra outputs are
    added to the serialized proto, which also works for graphs whose nodes
    are not in topological order (``clone`` refuses those).
    """
    copy = model.clone()
    if not names:
        return copy
    by_name: dict[str, ir.Value] = {}
    for node in copy.graph:
        for out in node.outputs:
            if out.name:
                by_name[out.name] = out
    present = {v.name for v in copy.graph.outputs}
    for name in names:
        if name in present:
            continue
        value = by_name.get(name)
        if value is None:
            raise KeyError(f"no node output named {name!r}")
        copy.graph.outputs.append(value)
        present.add(name)
    return copy


def _external_dirs(model: ir.Model) -> set[str]:
    dirs: set[str] = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                dirs.add(os.fspath(tensor.base_dir))
    return dirs


def _in_memory_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and not isinstance(tensor, ir.ExternalTensor):
                total += tensor.nbytes
    return total


def _session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No arena: it keeps the largest buffers a run ever needed (an LM head's packed
    # operand, 100+ MB) for the session's life, once per session; verification's
    # runs are few and small, so plain allocations cost nothing noticeable.
    so.enable_cpu_mem_arena = False
    # No prepacking: it gives every session a private copy of each MatMul weight (the
    # copies shared weights avoid, qgraph.verify.shared_weights), and a prepacked GEMM
    # rounds differently (~1e-5 relative) from an unpacked one, so it is off for every
    # verification session alike -- both sides of a comparison take the same kernels.
    so.add_session_config_entry("session.disable_prepacking", "1")
    # Fatal only: a rejected input is reported through the exception, and
    # onnxruntime's own log lines would land in the user's terminal.
    so.log_severity_level = 4
    return so


def _ortvalue_to_numpy(value: ort.OrtValue) -> np.ndarray:
    dtype = _ORT_TYPE_TO_NUMPY.get(value.data_type())
    if dtype is None:
        return value.numpy()
    # numpy cannot receive these from the binding: copy the raw CPU buffer.
    shape = tuple(value.shape())
    raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _numpy_to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    array = np.ascontiguousarray(array)
    if array.dtype in _ORT_TYPE_TO_NUMPY.values():
        onnx_type = ir.DataType.from_numpy(array.dtype)
        carrier = array.view(np.uint16 if array.dtype.itemsize == 2 else np.uint8)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(carrier, int(onnx_type))
    return ort.OrtValue.ortvalue_from_numpy(array)


class OrtRunner:
    """One onnxruntime session over an IR model (optionally exposing extra values)."""

    def __init__(
        self,
        model: ir.Model,
        *,
        extra_outputs: Sequence[str] = (),
        threads: int = 1,
        label: str = "model",
    ) -> None:
        self.label = label
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        options = _session_options(threads)
        self._shared: list[object] = []  # the mapped weights this session reads: alive as long as it is
        try:
            payload = self._payload(model, list(extra_outputs), options)
            self.session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - every load failure is reported the same way
            self.close()
            raise RunError(f"onnxruntime cannot load {label}: {_first_line(exc)}", stage="load") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _payload(self, model: ir.Model, extra_outputs: list[str], options: ort.SessionOptions) -> bytes | str:
        dirs = _external_dirs(model)
        if len(dirs) <= 1 and _in_memory_bytes(model) < _PROTO_LIMIT_BYTES:
            proto = ir.to_proto(model)
            present = {o.name for o in proto.graph.output}
            for name in extra_outputs:
                if name not in present:
                    # Name only: onnxruntime infers the type of a graph output.
                    proto.graph.output.add().name = name
                    present.add(name)
            if dirs:
                options.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", dirs.pop()
                )
                self._shared = share_external_weights(model, options)
            return proto.SerializeToString()
        # Several weight folders or a >2 GB in-memory model: write a copy.
        runnable = with_outputs(model, extra_outputs)
        self._tmp = tempfile.TemporaryDirectory(prefix="qgraph-verify-")
        path = os.path.join(self._tmp.name, "model.onnx")
        ir.save(runnable, path, external_data="model.onnx.data")
        return path

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; raises RunError when onnxruntime rejects the feeds."""
        try:
            ort_feeds = {name: _numpy_to_ortvalue(feeds[name]) for name in self.input_names}
            values = self.session.run_with_ort_values(self.output_names, ort_feeds, _QUIET_RUN)
        except KeyError as exc:
            raise RunError(f"{self.label}: no value fed for input {exc.args[0]!r}", stage="run") from exc
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated kinds
            raise RunError(f"{self.label} failed: {_first_line(exc)}", stage="run") from exc
        return {name: _ortvalue_to_numpy(v) for name, v in zip(self.output_names, values, strict=True)}

    def close(self) -> None:
        if self._tmp is not None or self._shared:
            # The session reads the mapped weights and the written copy: it goes before them.
            self.session = None  # type: ignore[assignment]
        self._shared = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> OrtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # onnxruntime prefixes messages with "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ...".
    return text.splitlines()[0] if text else type(exc).__name__


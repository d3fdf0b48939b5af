"""The two torch exporters, behind one call, and a check of what they produce.

Users bring graphs from both torch exporters and the two differ a lot (for
SmolLM2-135M the TorchScript exporter emits ~7,500 nodes, the dynamo exporter
~2,200, with different shape arithmetic), so qgraph exports with either:

* ``torchscript``: ``torch.onnx.export(dynamo=False)``, traced with
  ``dynamic_axes``; opsets 14-20 (14 is the first with the ops attention
  needs; 20 is the exporter's maximum); default 17.
* ``dynamo``: ``torch.onnx.export(dynamo=True)`` through torch.export with
  ``Dim`` objects for batch and sequence; opsets 18-23 (the exporter's own
  range); default 18. Its result is an ``onnx_ir.Model`` already and is
  saved with :func:`qgraph.io.save`, never serialized as one protobuf.

Both get the same interface afterwards (:func:`_normalize_interface`): input
and output names from :mod:`qgraph.export.wrappers`, the symbolic dims
``batch`` and ``seq``. Weights go to ``model.onnx.data`` once they exceed
:data:`EXTERNAL_DATA_MIN_BYTES`, so passes keep them on disk.

:func:`compare_with_torch` runs the saved graph in onnxruntime against the
torch module; an export is checked this way before it is published, and a
graph that disagrees is an :class:`ExportFailure` (exit 1), not a result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qgraph import io
from qgraph.errors import BadInputError, QGraphError
from qgraph.export.interface import INPUT_NAMES, output_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "EXTERNAL_DATA_MIN_BYTES",
    "OPSET_RANGE",
    "Comparison",
    "ExportFailure",
    "check_opset",
    "compare_with_torch",
    "export_to_file",
    "sample_inputs",
]

EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
OPSET_RANGE = {"torchscript": (14, 20), "dynamo": (18, 23)}

#: Weights above this size go to external data (``model.onnx.data``): a pass
#: then maps them lazily instead of parsing them into memory with the graph.
EXTERNAL_DATA_MIN_BYTES = 32 * 2**20

#: The example the exporters trace with: batch and sequence both > 1 (torch.export
#: specializes dimensions of size 0 and 1) and unlike any size the checks use.
TRACE_BATCH, TRACE_SEQ = 2, 16


class ExportFailure(QGraphError):
    """The exporter failed, or its graph disagrees with torch, on a valid model (exit code 1)."""

    exit_code = 1


def check_opset(exporter: str, opset: int | None) -> int:
    """The opset to export with; BadInputError for an exporter/opset pair that cannot work."""
    if exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    if opset is None:
        return DEFAULT_OPSET[exporter]
    low, high = OPSET_RANGE[exporter]
    if not low <= opset <= high:
        raise BadInputError(f"--opset {opset}: the {exporter} exporter supports opsets {low} to {high}")
    return opset


def sample_inputs(
    vocab_size: int, batch: int, seq: int, *, pad: int = 0, side: str = "left", seed: int = 0
) -> dict[str, np.ndarray]:
    """int64 ``input_ids`` below the vocab size and an ``attention_mask`` with ``pad`` zeros in row 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad:
        if side == "left":
            mask[0, :pad] = 0
        else:
            mask[0, seq - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' advisory chatter (TracerWarnings, deprecations, missing torchvision)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_to_file(
    module: torch.nn.Module,
    path: Path,
    *,
    exporter: str,
    opset: int,
    task: str,
    vocab_size: int,
    metadata: dict[str, str] | None = None,
) -> ir.Model:
    """Export ``module`` (a :mod:`~qgraph.export.wrappers` module) to ``path`` with ``exporter``.

    Returns the saved model (loaded back lazily: weights stay on disk).

    Raises:
        ExportFailure: the exporter raised.
    """
    import torch

    check_opset(exporter, opset)
    example = sample_inputs(min(vocab_size, 1000), TRACE_BATCH, TRACE_SEQ, seed=1)
    args = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
    output = output_name(task)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        try:
            # No torch.no_grad() here: both exporters manage grad mode themselves,
            # and under no_grad the dynamo export of SmolLM2 took 137 s instead of 110 s.
            with _quiet_export():
                if exporter == "torchscript":
                    model = _torchscript(module, args, Path(scratch) / "model.onnx", opset, task, output)
                else:
                    model = _dynamo(module, args, opset, output)
        except Exception as error:
            other = "torchscript" if exporter == "dynamo" else "dynamo"
            raise ExportFailure(
                f"the {exporter} exporter failed ({type(error).__name__}: {_first_line(error)}); "
                f"try --exporter {other}"
            ) from error
        _normalize_interface(model, task, output)
        for key, value in (metadata or {}).items():
            model.metadata_props[key] = value
        external = io.initializer_bytes(model) > EXTERNAL_DATA_MIN_BYTES
        io.save(model, path, external_data=external)
    return io.load(path)


def _torchscript(module, args, scratch_path: Path, opset: int, task: str, output: str) -> ir.Model:
    import torch

    dims = {0: "batch", 1: "seq"}
    dynamic_axes = {name: dict(dims) for name in INPUT_NAMES}
    dynamic_axes[output] = dict(dims) if task == "causal-lm" else {0: "batch"}
    torch.onnx.export(
        module, args, str(scratch_path), dynamo=False, opset_version=opset,
        input_names=list(INPUT_NAMES), output_names=[output], dynamic_axes=dynamic_axes,
        do_constant_folding=True,
    )
    # Loaded lazily from the scratch folder; the caller saves it before the
    # folder goes away (TorchScript writes external data itself past 2 GB).
    return io.load(scratch_path)


def _dynamo(module, args, opset: int, output: str) -> ir.Model:
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        module, args, dynamo=True, opset_version=opset,
        input_names=list(INPUT_NAMES), output_names=[output],
        dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES},
        verbose=False,
    )
    return program.model


def _normalize_interface(model: ir.Model, task: str, output: str) -> None:
    """Same names and symbolic dims from both exporters: inputs [batch, seq], outputs [batch, seq, V] / [batch, H]."""
    graph = model.graph
    names = [value.name for value in graph.inputs]
    if names != list(INPUT_NAMES) or [value.name for value in graph.outputs] != [output]:
        raise ExportFailure(f"the exported graph has inputs {names} and outputs "
                            f"{[v.name for v in graph.outputs]}, expected {list(INPUT_NAMES)} -> [{output!r}]")
    for value in graph.inputs:
        value.shape = ir.Shape(["batch", "seq"])
    out = graph.outputs[0]
    last = out.shape[-1] if out.shape is not None else None
    last_dim = last if isinstance(last, int) else None
    out.shape = ir.Shape(["batch", "seq", last_dim] if task == "causal-lm" else ["batch", last_dim])


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:400] if text else type(error).__name__


@dataclass(frozen=True)
class Comparison:
    """onnxruntime against torch on one input."""

    batch: int
    seq: int
    pad: int
    max_abs_diff: float
    max_abs_reference: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "DIFFERS"
        return (f"batch={self.batch} seq={self.seq} pad={self.pad}: max |onnx - torch| = {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}, max |torch| = {self.max_abs_reference:.3g}) {verdict}")


def compare_with_torch(
    module: torch.nn.Module,
    onnx_path: str | os.PathLike[str],
    task: str,
    vocab_size: int,
    cases: Sequence[tuple[int, int, int]] = ((2, 7, 2),),
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> list[Comparison]:
    """Run ``(batch, seq, pad)`` cases through onnxruntime and torch; compare the valid outputs.

    Causal LMs get ``pad`` positions of left padding in row 0 and are
    compared at valid positions only (padding rows are undefined); encoders
    get right padding and their pooled vectors are compared whole. The
    tolerance is ``atol + rtol * max|torch|``. The reference is ``module``
    itself, the module that was traced: for a ``plain`` export (the model
    counting positions itself, from column 0 under left padding for most
    models) that is the plain model's meaning, not the qgraph wrapper's.
    """
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure is raised with its message; no second copy on stderr
    try:
        session = ort.InferenceSession(os.fspath(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types; the exporter wrote a graph it refuses
        raise ExportFailure(f"onnxruntime cannot load the exported graph: {_first_line(error)}") from None
    results = []
    for index, (batch, seq, pad) in enumerate(cases):
        side = "left" if task == "causal-lm" else "right"
        feeds = sample_inputs(vocab_size, batch, seq, pad=pad, side=side, seed=100 + index)
        with torch.no_grad():
            reference = module(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)).numpy()
        try:
            (got,) = session.run(None, feeds)
        except Exception as error:  # e.g. a Reshape the exporter traced with a constant of the wrong size
            raise ExportFailure(f"onnxruntime cannot run the exported graph on batch={batch} seq={seq}: "
                                f"{_first_line(error)}") from None
        if got.shape != reference.shape:
            raise ExportFailure(f"onnxruntime gives shape {list(got.shape)}, torch {list(reference.shape)} "
                                f"for batch={batch} seq={seq}")
        if task == "causal-lm":
            valid = feeds["attention_mask"].astype(bool)
            got, reference = got[valid], reference[valid]
        scale = float(np.abs(reference).max()) if reference.size else 0.0
        diff = float(np.abs(got.astype(np.float64) - reference).max()) if reference.size else 0.0
        if not np.isfinite(got).all():
            diff = float("inf")
        results.append(Comparison(batch, seq, pad, diff, scale, atol + rtol * scale))
    return results

"""The Python entry point for tools that use qgraph as one stage of a pipeline.

``optimize`` takes a model in whatever form the caller has it (a path,
bytes, an ``onnx.ModelProto``, an ``onnx_ir.Model`` or an onnx-graphsurgeon
``Graph``) and gives it back in that same form, so qgraph slots in without
conversions on the caller's side. An ``onnx_ir.Model`` is rewritten in
place; the other forms are never modified.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from qgraph import io
from qgraph.manager import PassManager, RunReport
from qgraph.pipeline import Pipeline
from qgraph.registry import Registry, default_registry

__all__ = ["optimize", "optimize_with_report"]


def optimize_with_report(
    model: Any,
    pipeline: Pipeline | Sequence[Any] | None = None,
    *,
    preset: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    output: str | os.PathLike[str] | None = None,
    verify: bool = False,
    verify_examples: int = 5,
    registry: Registry | None = None,
) -> tuple[Any, RunReport]:
    """Like :func:`optimize`, and also return the per-pass ``RunReport``."""
    registry = registry or default_registry()
    if isinstance(model, (str, os.PathLike)) and output is None:
        raise ValueError("a model given as a path is given back as a file: pass output=")
    if pipeline is not None and preset is not None:
        raise ValueError("give either a pipeline or a preset, not both")
    if pipeline is None:
        pipeline = Pipeline.from_preset(preset or "cleanup", registry)
    elif not isinstance(pipeline, Pipeline):
        pipeline = Pipeline(pipeline)
    if options:
        pipeline.set_options(options)
    verifier = None
    if verify:
        from qgraph.verify import step_verifier

        verifier = step_verifier(examples=verify_examples)
    manager = PassManager(pipeline, registry=registry, verifier=verifier)
    ir_model = io.load(model)
    report = manager.run(ir_model)
    return io.to_kind_of(ir_model, model, output=output), report


def optimize(model: Any, pipeline: Pipeline | Sequence[Any] | None = None, **kwargs: Any) -> Any:
    """Run ``pipeline`` (default: the ``cleanup`` preset) and return the same kind of model.

    A path in gives the saved output path back (``output=`` is required and
    never equal to the input).
    """
    result, _ = optimize_with_report(model, pipeline, **kwargs)
    return result

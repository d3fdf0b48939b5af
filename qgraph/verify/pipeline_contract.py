"""One pipeline run on one graph, judged against the CLI's contract.

The fuzz suite (tests/test_fuzz_passes.py, benchmarks/fuzz_passes.py) runs
every registered pass and preset through ``qgraph optimize`` on random
graphs (:mod:`qgraph.verify.random_graphs`). The contract: a run either
*refuses cleanly* (exit 1 or 2 with a message, no traceback, no "internal
error", nothing written; a pass that broke a graph invariant has a bug and
does not count as refusing) or writes a model that onnxruntime loads and
that gives the input's outputs; the input file is never changed. Anything else
is a verdict with its detail, so a failure says which kind it is.

Passes whose declared purpose is to change the numbers (``fp16-emulate``,
"for checking only") are not run: they have no "same outputs" to check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

__all__ = ["Outcome", "VERDICTS", "configurations", "run_configuration", "write_graph"]

#: Every verdict, the two acceptable ones first.
VERDICTS = (
    "equivalent", "refused", "internal-error", "broken-invariant", "wrong-result", "input-changed", "unloadable",
    "unwritten",
)

_CHANGES_NUMBERS_BY_DESIGN = {"fp16-emulate", "truncate-layers"}
# Lossy by design, with a declared budget (weight quantization): run with --verify, which checks the
# output against that budget; exit 0 then means "within budget", so the outputs are not compared exactly.
_APPROXIMATE_PASSES = {"quantize"}


@dataclasses.dataclass
class Outcome:
    configuration: str
    verdict: str
    exit_code: int
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict in VERDICTS[:2]


def configurations() -> dict[str, list[str]]:
    """label -> the ``qgraph optimize`` arguments: every registered preset and pass."""
    from qgraph.registry import default_registry

    registry = default_registry()
    configs = {f"preset {name}": ["--preset", name] for name in registry.preset_names()}
    configs.update(
        {f"pass {name}": ["--passes", name] for name in registry.names() if name not in _CHANGES_NUMBERS_BY_DESIGN}
    )
    for label, arguments in configs.items():
        if _approximate(label):
            arguments.append("--verify")
    return configs


def _approximate(label: str) -> bool:
    """A configuration that runs a lossy pass: ``pass quantize``, or a preset holding it (``ort-int4``)."""
    kind, name = label.split(" ", 1)
    if kind == "pass":
        return name in _APPROXIMATE_PASSES
    from qgraph.pipeline import Pipeline
    from qgraph.registry import default_registry

    return any(step.name in _APPROXIMATE_PASSES for step in Pipeline.from_preset(name, default_registry()).pass_steps())


def _session(path_or_bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _differs(expected: np.ndarray, got: np.ndarray) -> str | None:
    if expected.shape != got.shape:
        return f"shape {list(got.shape)} instead of {list(expected.shape)}"
    a, b = expected.astype(np.float64), got.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    close = np.isclose(a, b, rtol=2e-3, atol=2e-3) | both_nan
    if close.all():
        return None
    worst = np.nanmax(np.abs(a - b)[~close])
    return f"{int((~close).sum())} element(s) differ, by up to {worst:.3g}"


def run_configuration(
    source: Path, label: str, arguments: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> Outcome:
    """Run ``qgraph optimize SOURCE -o OUT ARGUMENTS`` in this process and judge it on ``feeds``."""
    from qgraph.cli import main

    before = source.read_bytes()
    out = source.with_name(f"{source.stem}.{label.replace(' ', '-')}.out.onnx")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["optimize", str(source), "-o", str(out), *arguments], out=io.StringIO())
    message = err.getvalue()
    if source.read_bytes() != before:
        return Outcome(label, "input-changed", code, message)
    if code not in (0, 1, 2) or "Traceback" in message or "internal error" in message:
        return Outcome(label, "internal-error", code, message[-2000:])
    if code != 0:
        if "broke graph invariants" in message:  # a pass wrote an invalid graph: its bug, not a refusal
            return Outcome(label, "broken-invariant", code, message.strip()[:2000])
        if out.exists():
            return Outcome(label, "internal-error", code, f"exit {code} but {out.name} was written")
        return Outcome(label, "refused", code, message.strip().splitlines()[0] if message.strip() else "")
    if not out.exists():
        return Outcome(label, "unwritten", code, "exit 0 without the output file")
    try:
        session = _session(os.fspath(out))
    except Exception as error:  # noqa: BLE001 - any refusal is the verdict
        return Outcome(label, "unloadable", code, str(error)[:500])
    reference = _session(before)
    names = [o.name for o in reference.get_outputs()]
    for feed in feeds:
        expected = dict(zip(names, reference.run(names, dict(feed))))
        wanted = {i.name for i in session.get_inputs()}
        got = dict(zip(names, session.run(names, {k: v for k, v in feed.items() if k in wanted})))
        for name in names:
            if "--verify" in arguments and _approximate(label):  # checked against its budget by --verify
                problem = None if expected[name].shape == got[name].shape else (
                    f"shape {list(got[name].shape)} instead of {list(expected[name].shape)}")
            else:
                problem = _differs(expected[name], got[name])
            if problem:
                return Outcome(label, "wrong-result", code, f"output {name!r}: {problem}")
    out.unlink()
    for extra in out.parent.glob(f"{out.name}*"):
        extra.unlink()
    return Outcome(label, "equivalent", code)


def write_graph(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "graph.onnx"
    path.write_bytes(model.SerializeToString())
    return path

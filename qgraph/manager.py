"""Running a pipeline: prerequisites, invariants, verification and the report.

Each pass is an ``onnx_ir`` pass called through its own ``__call__`` (so its
``requires``/``ensures`` hooks run). Around it the manager

* satisfies declared prerequisites by running the providing pass first (and
  records that it did), or stops naming what is missing;
* records wall time, whether the model changed, node counts, the op
  histogram and the pass's own report (matches per rule, notes);
* checks graph invariants after every pass that changed the model, and stops
  naming the pass that broke one (``InvariantChecker``: the onnx checker sees
  only the nodes changed since its last call);
* optionally verifies each changed step against the model before it, so a
  pass that changes the meaning is named, not just the final model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qgraph.errors import BadInputError, InvariantViolation, PassFailure, QGraphError
from qgraph.graph_stats import op_histogram
from qgraph.invariants import InvariantChecker
from qgraph.pass_base import Pass
from qgraph.pipeline import FixpointPasses, Pipeline
from qgraph.registry import Registry, default_registry

__all__ = ["PassManager", "PassRecord", "RunReport"]

# verify(before, after, pass_name) raises PassFailure when the step changed
# the meaning; it may return a sentence saying what it proved, which the
# report and the table show (otherwise the pass's declared meaning is shown).
# For a pass whose ``meaning`` is not "outputs" (fp16-clip, kv-cache), the
# manager also passes ``meaning=`` so the verifier checks the right property;
# ``qgraph.verify.step_verifier`` knows every meaning a built-in pass declares.
Verifier = Callable[..., None]


@dataclasses.dataclass
class PassRecord:
    """What one pass run did (one entry of ``--report``)."""

    name: str
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int
    op_histogram: dict[str, int]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    rule_matches: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    prerequisite_of: str | None = None
    fixpoint_iteration: int | None = None
    verified: bool | None = None
    verification: str | None = None  # what --verify proved for this step
    near_misses: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["seconds"] = round(self.seconds, 6)
        return {k: v for k, v in data.items() if v is not None}


@dataclasses.dataclass
class RunReport:
    """The whole run: one record per executed pass, in order."""

    pipeline: str
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "seconds": round(self.seconds, 6),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "warnings": self.warnings,
            "passes": [p.to_dict() for p in self.passes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write_json(self, path: str | Path) -> None:
        from qgraph.atomic import write_text_atomic

        write_text_atomic(Path(path), self.to_json())

    def format_table(self) -> str:
        """The per-pass table, then the near misses and what --verify proved (or that it did not run)."""
        rows = [("pass", "seconds", "changed", "nodes", "matches", "verified")]
        for rec in self.passes:
            name = rec.name
            if rec.prerequisite_of:
                name += f" (for {rec.prerequisite_of})"
            if rec.fixpoint_iteration is not None:
                name += f" [iter {rec.fixpoint_iteration}]"
            matches = ", ".join(f"{k}={v}" for k, v in rec.rule_matches.items())
            verified = rec.verification or ("-" if not rec.changed else "no")
            rows.append((name, f"{rec.seconds:.3f}", "yes" if rec.changed else "no",
                         f"{rec.nodes_before} -> {rec.nodes_after}", matches, verified))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"total {self.seconds:.3f} s, nodes {self.nodes_before} -> {self.nodes_after}")
        for rec in self.passes:
            for rule, miss in rec.near_misses.items():
                lines.append(
                    f"near miss in {rec.name}: {rule}: {miss['candidates']} candidate(s) rejected, most often "
                    f"({miss['times']}x) by: {miss['most_common_check']}"
                    + (f" ({miss['listed_by']})" if miss.get("listed_by") else "")
                )
        changed = [rec for rec in self.passes if rec.changed]
        if changed and not any(rec.verified for rec in changed):
            lines.append("not verified: run with --verify to check every pass that changed the model")
        return "\n".join(lines)


class PassManager:
    """Runs a ``Pipeline`` on an ``ir.Model`` in place."""

    def __init__(
        self,
        pipeline: Pipeline | Sequence[Any],
        *,
        registry: Registry | None = None,
        check_invariants: bool = True,
        run_onnx_checker: bool = True,
        verifier: Verifier | None = None,
        before_pass: Callable[[Pass, ir.Model], bool | None] | None = None,
    ) -> None:
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
        self.registry = registry or default_registry()
        self.check_invariants = check_invariants
        self.run_onnx_checker = run_onnx_checker
        self.verifier = verifier
        self.before_pass = before_pass
        # Validate every pass and option now, before the model is touched.
        self._instances = self.pipeline.instantiate(self.registry)
        self._histogram: dict[str, int] | None = None
        self._checker = InvariantChecker(run_onnx_checker=run_onnx_checker)

    def _op_histogram(self, model: ir.Model) -> dict[str, int]:
        # Kept from one pass to the next until a pass reports a change: in a
        # fixpoint most runs change nothing, and walking the graph twice per
        # pass was a measurable share of a whole preset's time.
        if self._histogram is None:
            self._histogram = op_histogram(model.graph)
        return self._histogram

    def _node_count(self, model: ir.Model) -> int:
        return sum(self._op_histogram(model).values())

    def run(self, model: ir.Model) -> RunReport:
        report = RunReport(pipeline=self.pipeline.describe() or self.pipeline.name)
        self._histogram = None
        self._checker = InvariantChecker(run_onnx_checker=self.run_onnx_checker)
        if self.check_invariants:
            self._checker.baseline(model)
        report.nodes_before = self._node_count(model)
        start = time.perf_counter()
        try:
            for step in self._instances:
                if isinstance(step, FixpointPasses):
                    self._run_fixpoint(step, model, report)
                else:
                    self._run_one(step, model, report)
        except _Stop:
            pass
        report.seconds = time.perf_counter() - start
        report.nodes_after = self._node_count(model)
        return report

    def _run_fixpoint(self, group: FixpointPasses, model: ir.Model, report: RunReport) -> None:
        passes, bound = group.passes, group.max_iterations
        for iteration in range(1, bound + 1):
            changed = False
            for p in passes:
                changed |= self._run_one(p, model, report, iteration=iteration)
            if not changed:
                return
        names = ", ".join(p.name for p in passes)
        report.warnings.append(f"fixpoint({names}) still changed the model after {bound} iterations")

    def _satisfy_prerequisites(self, p: Pass, model: ir.Model, report: RunReport) -> _Undo | None:
        """Run the passes that establish ``p``'s missing prerequisites; how to undo them if ``p`` then does nothing."""
        missing = p.missing_prerequisites(model)
        if not missing:
            return None
        helpers = []
        for prereq in missing:
            provider = prereq.satisfied_by
            if provider is None or provider not in self.registry:
                hint = f" (pass '{provider}' would provide it, but it is not registered)" if provider else ""
                raise BadInputError(f"pass '{p.name}' requires {prereq.description}, which the model lacks{hint}")
            helpers.append((prereq, self.registry.create(provider, prereq.options)))
        # One provider that can take its own work back spares the copy of the whole model.
        restore = helpers[0][1].undo_for(model) if len(helpers) == 1 else None
        undo = _Undo(None if restore is not None else model.clone(), len(report.passes), restore)
        for prereq, helper in helpers:
            self._run_one(helper, model, report, prerequisite_of=p.name)
            if not prereq.check(model):
                raise PassFailure(
                    f"pass '{p.name}' requires {prereq.description}; '{prereq.satisfied_by}' ran but did not "
                    f"establish it{_why_not(report.passes[-1].notes if report.passes else [])}",
                    pass_name=p.name,
                )
        return undo

    def _undo_prerequisites(self, p: Pass, model: ir.Model, report: RunReport, undo: _Undo) -> None:
        """``p`` rewrote nothing, so what was done only for it (an opset raised to 23) is taken back.

        A model must not come out at another opset, with another IR version
        or converted ops, from a pipeline that did nothing to it: a raised
        opset can make onnxruntime reject an untouched node.
        """
        if undo.restore is not None:
            undo.restore()
        else:
            snapshot = undo.snapshot
            model.graph = snapshot.graph
            model.functions.clear()
            model.functions.update(snapshot.functions)
            model.ir_version = snapshot.ir_version
            model.metadata_props.clear()
            model.metadata_props.update(snapshot.metadata_props)
        for record in report.passes[undo.first_record :]:
            if record.prerequisite_of == p.name and record.changed:
                record.changed = False
                record.notes.append(f"undone: '{p.name}' rewrote nothing")
        self._histogram = None
        if self.check_invariants:
            self._checker.baseline(model)

    def _run_one(
        self,
        p: Pass,
        model: ir.Model,
        report: RunReport,
        *,
        prerequisite_of: str | None = None,
        iteration: int | None = None,
    ) -> bool:
        undo = self._satisfy_prerequisites(p, model, report)
        if self.before_pass is not None:
            self._histogram = None  # the hook may edit the model
            if self.before_pass(p, model) is False:
                raise _Stop()
        snapshot = model.clone() if self.verifier is not None else None
        nodes_before = self._node_count(model)
        start = time.perf_counter()
        try:
            with _graph_frozen():
                result = p(model)
        except QGraphError as exc:
            if isinstance(exc, PassFailure) and exc.pass_name is None:
                exc.pass_name = p.name
            raise
        except ir.passes.PreconditionError as exc:
            raise PassFailure(f"pass '{p.name}': precondition failed: {_cause(exc)}", pass_name=p.name) from exc
        except ir.passes.PostconditionError as exc:
            raise PassFailure(f"pass '{p.name}': postcondition failed: {_cause(exc)}", pass_name=p.name) from exc
        except Exception as exc:
            raise PassFailure(f"pass '{p.name}' failed: {type(exc).__name__}: {exc}", pass_name=p.name) from exc
        seconds = time.perf_counter() - start
        if result.model is not model:
            raise PassFailure(f"pass '{p.name}' returned a different model object; qgraph passes work in place", pass_name=p.name)
        if result.modified:
            self._histogram = None
        histogram = self._op_histogram(model)
        record = PassRecord(
            name=p.name,
            seconds=seconds,
            changed=bool(result.modified),
            nodes_before=nodes_before,
            nodes_after=sum(histogram.values()),
            op_histogram=dict(histogram),
            options=dict(p.config),
            rule_matches=dict(p.report.rule_matches),
            notes=list(p.report.notes),
            near_misses=dict(p.report.near_misses),
            prerequisite_of=prerequisite_of,
            fixpoint_iteration=iteration,
        )
        report.passes.append(record)
        # A prerequisite's changes are checked with those of the pass it ran
        # for: if that pass rewrites nothing they are undone, and an opset
        # raised for nothing must not fail the run.
        if result.modified and self.check_invariants and prerequisite_of is None:
            problems = self._checker(model)
            if problems:
                listing = "\n  ".join(problems[:10])
                more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
                helpers = " (with the prerequisites it ran)" if undo is not None else ""
                raise InvariantViolation(
                    f"pass '{p.name}'{helpers} broke graph invariants:\n  {listing}{more}", pass_name=p.name
                )
        if undo is not None and not result.modified:
            self._undo_prerequisites(p, model, report, undo)
        if snapshot is not None and result.modified:
            if p.meaning == "outputs":
                proved = self.verifier(snapshot, model, p.name)
            elif p.meaning == "approximate":
                proved = self.verifier(snapshot, model, p.name, meaning=p.meaning, budget=p.verification_budget())
            else:
                proved = self.verifier(snapshot, model, p.name, meaning=p.meaning)
            record.verified = True
            record.verification = proved if isinstance(proved, str) else f"meaning '{p.meaning}' kept"
        return record.changed


@dataclasses.dataclass
class _Undo:
    """How to take a pass's prerequisites back -- the model before they ran (tensors shared), or the
    provider's own restore function -- and where their records start."""

    snapshot: ir.Model | None
    first_record: int
    restore: Callable[[], None] | None = None


@contextlib.contextmanager
def _graph_frozen():
    """Run a pass with what exists before it out of the garbage collector's sight.

    A pass allocates nodes and values as it goes, and every full collection
    the allocations trigger scans every live object -- the whole model. That
    made allocation-heavy passes superlinear in depth (lower-attention: 33x
    the time for 16x the nodes). The model is live by definition, so the
    objects that exist when a pass starts are frozen (``gc.freeze``) and
    released to the collector again when it ends.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _why_not(notes: list[str], shown: int = 3) -> str:
    """The provider's own notes (what it refused, where, which check failed), so the error says why."""
    if not notes:
        return ""
    more = f"; {len(notes) - shown} more in the report" if len(notes) > shown else ""
    return ": " + "; ".join(notes[:shown]) + more


class _Stop(Exception):
    """Raised by a before_pass hook's False to end the run early."""


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__
    return f"{exc}" + (f" ({cause})" if cause is not None else "")

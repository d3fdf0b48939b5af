"""Property-based equivalence of two ONNX graphs, checked in onnxruntime.

``check_equivalent(reference, candidate)`` lets hypothesis draw inputs the
reference accepts (:mod:`qgraph.verify.strategies`), runs both graphs
(:mod:`qgraph.verify.runner`) and compares every output with a tolerance
that depends on the dtype (:mod:`qgraph.verify.compare`). The first failing
input is shrunk by hypothesis to a small one, saved as ``inputs.npz``, and
the first tensor on which the graphs part ways is named
(:mod:`qgraph.verify.localize`). Nothing is printed: the result carries the
report, the seed, the concrete shapes, the saved inputs and a one-line
command that reproduces the failure.

Inputs the *reference* rejects (onnxruntime raises on them) are not
failures: they tell hypothesis the drawn example is invalid. A candidate
that raises where the reference runs is a failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import onnx_ir as ir
from hypothesis import HealthCheck, Phase, Verbosity, reject
from hypothesis.errors import NoSuchExample, Unsatisfiable

from qgraph import io as qio
from qgraph.errors import BadInputError, PassFailure
from qgraph.verify.artifacts import artifacts_folder
from qgraph.verify.compare import ComparisonReport, Tolerance, compare_outputs
from qgraph.verify.correspondence import Correspondence, correspond, matching_notes
from qgraph.verify.localize import Divergence, localize
from qgraph.verify.padded_rows import skip_padding_rows
from qgraph.verify.runner import OrtRunner, RunError
from qgraph.verify.scratch import private_hypothesis_home
from qgraph.verify.strategies import Example, InputOptions, input_strategy

__all__ = [
    "EquivalenceResult",
    "NotEquivalentError",
    "check_equivalent",
    "load_inputs",
    "replay",
    "save_inputs",
    "step_verifier",
    "verify_step",
]

DEFAULT_EXAMPLES = 20
_DTYPE_KEY = "__dtype__."


@dataclasses.dataclass
class EquivalenceResult:
    """The verdict, and for a failure everything needed to understand and reproduce it.

    ``report`` compares the outputs on the shrunk failing example; ``error``
    is set instead when the candidate could not be loaded or run.
    ``pass_name``/``rule_name`` are filled by the pass manager (or taken from
    the node metadata of the diverging node).
    """

    equivalent: bool
    examples: int  # distinct inputs run: all of them, or up to and including the first failure
    seed: int | None
    shrink_runs: int = 0
    report: ComparisonReport | None = None
    error: str | None = None
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    padding: str | None = None
    inputs_path: str | None = None
    divergence: Divergence | None = None
    localization_note: str | None = None
    reproduction: str | None = None
    pass_name: str | None = None
    rule_name: str | None = None
    reference_label: str = "the reference"
    candidate_label: str = "the candidate"
    seconds: float = 0.0
    # How inputs/outputs were paired, examples the reference rejected,
    # artifacts not kept: printed under the headline whatever the verdict.
    notes: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return self.equivalent

    def headline(self) -> str:
        """One line: the verdict and who is to blame."""
        who = f"pass {self.pass_name!r}" if self.pass_name else self.candidate_label
        if self.rule_name:
            who += f" (rule {self.rule_name!r})"
        if self.equivalent:
            return (
                f"EQUIVALENT: {self.candidate_label} matches {self.reference_label} on "
                f"{self.examples} examples (seed {self.seed})"
            )
        if self.pass_name:
            return f"NOT EQUIVALENT: {who} changed the model's meaning"
        return f"NOT EQUIVALENT: {self.candidate_label} differs from {self.reference_label}"

    def __str__(self) -> str:
        lines = [self.headline(), *self.notes]
        if self.equivalent:
            return "\n".join(lines)
        if self.shapes:
            dims = " ".join(f"{k}={v}" for k, v in self.dims.items()) or "none"
            shapes = ", ".join(f"{n}{list(s)}" for n, s in self.shapes.items())
            pad = f", padding {self.padding}" if self.padding else ""
            lines.append(
                f"failing example (example {self.examples}, seed {self.seed}, shrunk in "
                f"{self.shrink_runs} runs): "
                f"dims {dims}{pad}; inputs {shapes}"
            )
        if self.error:
            lines.append(f"error: {self.error}")
        if self.report is not None:
            lines.append(str(self.report))
        if self.divergence is not None:
            lines.append(str(self.divergence))
        elif self.localization_note:
            lines.append(self.localization_note)
        if self.inputs_path:
            lines.append(f"inputs saved to {self.inputs_path}")
        if self.reproduction:
            lines.append(f"reproduce: {self.reproduction}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "equivalent": self.equivalent,
            "examples": self.examples,
            "seed": self.seed,
            "shrink_runs": self.shrink_runs,
            "pass_name": self.pass_name,
            "rule_name": self.rule_name,
            "error": self.error,
            "dims": dict(self.dims),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "padding": self.padding,
            "inputs_path": self.inputs_path,
            "reproduction": self.reproduction,
            "report": None if self.report is None else self.report.to_dict(),
            "divergence": None if self.divergence is None else self.divergence.to_dict(),
            "localization_note": self.localization_note,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


class NotEquivalentError(PassFailure):
    """A verified step changed the model's meaning; carries the result."""

    def __init__(self, result: EquivalenceResult) -> None:
        super().__init__(str(result), pass_name=result.pass_name)
        self.result = result


# --- inputs on disk -----------------------------------------------------------


def save_inputs(feeds: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> str:
    """Write feeds to an .npz; dtypes numpy cannot store (bf16, fp8) are kept by name."""
    arrays: dict[str, np.ndarray] = {}
    for name, array in feeds.items():
        if array.dtype.kind == "V" or array.dtype.type.__module__.startswith("ml_dtypes"):
            arrays[name] = array.view(f"u{array.dtype.itemsize}")
            arrays[_DTYPE_KEY + name] = np.array(array.dtype.name)
        else:
            arrays[name] = array
    np.savez(path, **arrays)
    return os.fspath(path)


def load_inputs(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read feeds written by :func:`save_inputs`."""
    import ml_dtypes

    try:
        with np.load(path, allow_pickle=False) as data:
            raw = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{os.fspath(path)}: cannot read inputs ({exc})") from None
    feeds: dict[str, np.ndarray] = {}
    for name, array in raw.items():
        if name.startswith(_DTYPE_KEY):
            continue
        dtype_name = raw.get(_DTYPE_KEY + name)
        feeds[name] = array.view(getattr(ml_dtypes, str(dtype_name))) if dtype_name is not None else array
    return feeds


# --- the check ----------------------------------------------------------------


def _digest(feeds: Mapping[str, np.ndarray]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name, array in feeds.items():
        h.update(name.encode())
        h.update(str(array.dtype).encode())
        h.update(repr(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.digest()


def _candidate_feeds(corr: Correspondence, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {cand: feeds[ref] for cand, ref in corr.inputs.items()}


class _ReferenceRejectsEverything(Exception):
    """Raised through hypothesis to stop drawing when no input has run yet.

    hypothesis would otherwise keep drawing hundreds of invalid examples
    before giving up.
    """


@dataclasses.dataclass
class _Outcome:
    failed: bool
    report: ComparisonReport | None
    error: str | None


class _PairRunner:
    """Runs both graphs on a drawn example and remembers each verdict.

    The cache keeps hypothesis' final replay of the shrunk example consistent
    with the verdict it shrank on, even after the shrink budget is spent.
    """

    def __init__(
        self,
        ref: OrtRunner,
        cand: OrtRunner,
        corr: Correspondence,
        tolerances: Mapping[str, Tolerance] | None,
        max_shrink_runs: int,
        max_rejections: int = 50,
    ) -> None:
        self.ref, self.cand, self.corr = ref, cand, corr
        self.tolerances = tolerances
        self.max_shrink_runs = max_shrink_runs
        self.cache: dict[bytes, _Outcome | None] = {}
        self.valid = 0
        self.last_rejection: str | None = None
        self.runs_since_failure: int | None = None
        self.valid_at_failure = 0
        self.rejections = 0
        self.max_rejections = max_rejections
        self.padding_rows = 0  # output rows at padding query positions, not compared
        self.skip_padding_queries = True

    def candidate_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _candidate_feeds(self.corr, feeds)

    def evaluate(self, feeds: Mapping[str, np.ndarray]) -> _Outcome | None:
        """None: the reference rejects these feeds (an invalid example)."""
        try:
            ref_out = self.ref.run(feeds)
        except RunError as exc:
            self.last_rejection = str(exc)
            return None
        try:
            cand_out = self.cand.run(self.candidate_feeds(feeds))
        except RunError as exc:
            return _Outcome(True, None, str(exc))
        if self.skip_padding_queries:
            self.padding_rows += skip_padding_rows(feeds, ref_out, cand_out, self.corr.outputs)
        report = compare_outputs(
            ref_out,
            cand_out,
            self.corr.outputs,
            tolerances=self.tolerances,
            matched_by=self.corr.outputs_by,
        )
        return _Outcome(not report.passed, report, None)

    def __call__(self, example: Example) -> bool:
        """hypothesis' condition: True when the graphs disagree on ``example``."""
        key = _digest(example.feeds)
        if key in self.cache:
            outcome = self.cache[key]
        elif self.runs_since_failure is not None and self.runs_since_failure >= self.max_shrink_runs:
            return False  # shrink budget spent: no new candidates are accepted
        else:
            outcome = self.evaluate(example.feeds)
            self.cache[key] = outcome
            if outcome is not None:
                self.valid += 1
            if self.runs_since_failure is not None:
                self.runs_since_failure += 1
            elif outcome is not None and outcome.failed:
                self.runs_since_failure = 0
                self.valid_at_failure = self.valid
        if outcome is None:
            self.rejections += 1
            if self.valid == 0 and self.rejections >= self.max_rejections:
                raise _ReferenceRejectsEverything()
            reject()
        return outcome.failed


def _label(source: Any, default: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return default


def _save_model(model: ir.Model, path: Path) -> str:
    return os.fspath(qio.save(model, path))


def check_equivalent(
    reference: qio.ModelSource,
    candidate: qio.ModelSource,
    *,
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = 0,
    strategies: Mapping[str, Any] | None = None,
    options: InputOptions | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
    localize_divergence: bool = True,
    chunk_size: int = 4096,
    artifacts_dir: str | os.PathLike[str] | None = None,
    save_models: bool = True,
    save_artifacts: bool = True,
    max_shrink_runs: int = 300,
    threads: int = 1,
    pass_name: str | None = None,
    reference_label: str | None = None,
    candidate_label: str | None = None,
    compare_padding_queries: bool = False,
) -> EquivalenceResult:
    """Check that ``candidate`` computes what ``reference`` computes.

    ``reference``/``candidate``: an ``onnx_ir.Model``, ``onnx.ModelProto``,
    bytes or a path (neither is modified). ``examples``: inputs hypothesis
    tries before declaring the graphs equivalent. ``seed``: fixes the drawn
    inputs (None picks one at random; the result reports it).
    ``strategies``: per-input overrides (see :func:`input_strategy`);
    ``options``: sizes and ranges of drawn inputs; ``tolerances``: per-output
    overrides of the dtype defaults. On failure the inputs are written to
    ``artifacts_dir`` (a new temporary folder by default), with copies of
    in-memory models when ``save_models``, so ``reproduction`` runs as is;
    ``save_artifacts=False`` writes nothing (callers that only need the
    verdict, such as rule self-checks).
    ``max_shrink_runs`` bounds the graph runs spent shrinking.
    Output rows at padding query positions have no defined meaning and are
    not compared (:mod:`qgraph.verify.padded_rows`; the result notes how
    many) unless ``compare_padding_queries``.

    Raises:
        BadInputError: a model cannot be read, the reference cannot be
            loaded by onnxruntime or rejects every drawn input, or the two
            models' inputs/outputs do not correspond.
    """
    started = time.perf_counter()
    ref_label = reference_label or _label(reference, "the reference")
    cand_label = candidate_label or _label(candidate, "the candidate")
    ref_model = qio.load(reference)
    cand_model = qio.load(candidate)
    corr = correspond(ref_model, cand_model, reference_label=ref_label, candidate_label=cand_label)
    if seed is None:
        seed = random.randrange(2**32)
    result = EquivalenceResult(
        equivalent=False,
        examples=0,
        seed=seed,
        pass_name=pass_name,
        reference_label=ref_label,
        candidate_label=cand_label,
    )
    try:
        ref_runner = OrtRunner(ref_model, threads=threads, label=ref_label)
    except RunError as exc:
        raise BadInputError(str(exc)) from None
    try:
        cand_runner = OrtRunner(cand_model, threads=threads, label=cand_label)
    except RunError as exc:
        ref_runner.close()
        result.error = str(exc)
        result.seconds = time.perf_counter() - started
        return result

    try:
        strategy = input_strategy(ref_model, strategies=strategies, options=options)
    except ValueError as exc:
        raise BadInputError(f"{ref_label}: {exc}") from None
    pair = _PairRunner(ref_runner, cand_runner, corr, tolerances, max_shrink_runs)
    pair.skip_padding_queries = not compare_padding_queries
    settings = hypothesis.settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=(Phase.generate, Phase.shrink),
        verbosity=Verbosity.quiet,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    failing: Example | None = None
    try:
        with private_hypothesis_home():
            failing = hypothesis.find(strategy, pair, settings=settings, random=random.Random(seed))
    except (NoSuchExample, Unsatisfiable, _ReferenceRejectsEverything):
        failing = None
    finally:
        ref_runner.close()
        cand_runner.close()
    result.examples = pair.valid_at_failure if failing is not None else pair.valid
    result.shrink_runs = pair.runs_since_failure or 0
    result.notes.extend(matching_notes(corr))
    if pair.padding_rows:
        result.notes.append(
            f"{pair.padding_rows} output row(s) at padding query positions (the query's own attention_mask "
            "entry is 0) were not compared: they have no defined meaning"
        )
    if pair.rejections and pair.valid:
        result.notes.append(
            f"{pair.rejections} drawn example(s) rejected by the reference and not counted "
            f"(last reason: {pair.last_rejection})"
        )
    if pair.valid == 0:
        raise BadInputError(
            f"{ref_label}: onnxruntime rejected every drawn input ({pair.last_rejection}); "
            "give dims or strategies for its inputs"
        )
    if failing is None:
        result.equivalent = True
        result.seconds = time.perf_counter() - started
        return result

    outcome = pair.cache[_digest(failing.feeds)]
    assert outcome is not None and outcome.failed
    result.report, result.error = outcome.report, outcome.error
    result.dims, result.shapes, result.padding = dict(failing.dims), failing.shapes, failing.padding
    _record_failure(
        result,
        ref_model,
        cand_model,
        failing.feeds,
        pair.candidate_feeds(failing.feeds),
        reference=reference,
        candidate=candidate,
        artifacts_dir=artifacts_dir,
        save_models=save_models,
        save_artifacts=save_artifacts,
        localize_divergence=localize_divergence and outcome.error is None,
        chunk_size=chunk_size,
        tolerances=tolerances,
        threads=threads,
    )
    result.seconds = time.perf_counter() - started
    return result


def _record_failure(
    result: EquivalenceResult,
    ref_model: ir.Model,
    cand_model: ir.Model,
    ref_feeds: Mapping[str, np.ndarray],
    cand_feeds: Mapping[str, np.ndarray],
    *,
    reference: Any,
    candidate: Any,
    artifacts_dir: str | os.PathLike[str] | None,
    save_models: bool,
    save_artifacts: bool,
    localize_divergence: bool,
    chunk_size: int,
    tolerances: Mapping[str, Tolerance] | None,
    threads: int,
) -> None:
    """Save the failing inputs (and in-memory models), localize, write the reproduction."""
    if save_artifacts:
        _save_artifacts(result, ref_model, cand_model, ref_feeds, reference, candidate, artifacts_dir, save_models)
    if localize_divergence:
        try:
            result.divergence = localize(
                ref_model, cand_model, ref_feeds, cand_feeds,
                chunk_size=chunk_size, tolerances=tolerances, threads=threads,
            )
        except RunError as exc:
            result.localization_note = f"could not localize: {exc}"
        else:
            if result.divergence is None:
                result.localization_note = (
                    "no shared intermediate tensor diverges: the difference arises in nodes "
                    "whose outputs have no same-named counterpart in the reference"
                )
            elif result.rule_name is None and result.divergence.candidate_node is not None:
                result.rule_name = result.divergence.candidate_node.rule_name


def _save_artifacts(
    result: EquivalenceResult,
    ref_model: ir.Model,
    cand_model: ir.Model,
    ref_feeds: Mapping[str, np.ndarray],
    reference: Any,
    candidate: Any,
    artifacts_dir: str | os.PathLike[str] | None,
    save_models: bool,
) -> None:
    """Write inputs.npz (and copies of in-memory models) and the reproduction line."""
    folder = Path(artifacts_dir) if artifacts_dir is not None else Path(tempfile.mkdtemp(prefix="qgraph-verify-"))
    folder.mkdir(parents=True, exist_ok=True)
    result.inputs_path = save_inputs(ref_feeds, folder / "inputs.npz")
    paths: list[str | None] = []
    for source, model, stem in ((reference, ref_model, "reference"), (candidate, cand_model, "candidate")):
        if isinstance(source, (str, os.PathLike)):
            paths.append(os.path.abspath(source))
        elif save_models:
            paths.append(_save_model(model, folder / f"{stem}.onnx"))
        else:
            paths.append(None)
    if all(paths):
        result.reproduction = " ".join(
            shlex.quote(p)
            for p in ["python", "-m", "qgraph.verify", paths[0], paths[1], "--inputs", result.inputs_path]  # type: ignore[list-item]
        )
    else:
        result.reproduction = f"qgraph.verify.replay(reference, candidate, {result.inputs_path!r})"


def replay(
    reference: qio.ModelSource,
    candidate: qio.ModelSource,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray],
    *,
    tolerances: Mapping[str, Tolerance] | None = None,
    localize_divergence: bool = True,
    threads: int = 1,
) -> EquivalenceResult:
    """Run both graphs on saved (or given) inputs, compare, and localize a mismatch."""
    started = time.perf_counter()
    ref_label = _label(reference, "the reference")
    cand_label = _label(candidate, "the candidate")
    feeds = dict(inputs) if isinstance(inputs, Mapping) else load_inputs(inputs)
    ref_model, cand_model = qio.load(reference), qio.load(candidate)
    corr = correspond(ref_model, cand_model, reference_label=ref_label, candidate_label=cand_label)
    result = EquivalenceResult(
        equivalent=False, examples=1, seed=None, reference_label=ref_label, candidate_label=cand_label
    )
    result.shapes = {n: tuple(a.shape) for n, a in feeds.items()}
    if not isinstance(inputs, Mapping):
        result.inputs_path = os.fspath(inputs)
    missing = sorted(set(corr.inputs.values()) - set(feeds))
    if missing:
        raise BadInputError(f"the saved inputs lack {', '.join(map(repr, missing))}")
    try:
        with OrtRunner(ref_model, threads=threads, label=ref_label) as ref_runner:
            ref_out = ref_runner.run(feeds)
    except RunError as exc:
        raise BadInputError(str(exc)) from None
    cand_feeds = _candidate_feeds(corr, feeds)
    try:
        with OrtRunner(cand_model, threads=threads, label=cand_label) as cand_runner:
            cand_out = cand_runner.run(cand_feeds)
    except RunError as exc:
        result.error = str(exc)
        result.seconds = time.perf_counter() - started
        return result
    result.report = compare_outputs(ref_out, cand_out, corr.outputs, tolerances=tolerances, matched_by=corr.outputs_by)
    result.equivalent = result.report.passed
    if not result.equivalent and localize_divergence:
        result.divergence = localize(ref_model, cand_model, feeds, cand_feeds, tolerances=tolerances, threads=threads)
        if result.divergence is not None and result.divergence.candidate_node is not None:
            result.rule_name = result.divergence.candidate_node.rule_name
    result.seconds = time.perf_counter() - started
    return result


# --- the pass manager's hook ----------------------------------------------------


def verify_step(
    before: qio.ModelSource,
    after: qio.ModelSource,
    *,
    examples: int = 10,
    pass_name: str,
    seed: int | None = 0,
    **kwargs: Any,
) -> EquivalenceResult:
    """Check one pipeline step: ``after`` (the pass's output) against ``before`` (its snapshot).

    Other keyword arguments go to :func:`check_equivalent`. The result names
    the pass, and the rule when the diverging node carries ``qgraph.rule``.
    """
    return check_equivalent(
        before,
        after,
        examples=examples,
        seed=seed,
        pass_name=pass_name,
        reference_label=kwargs.pop("reference_label", f"the model before pass {pass_name!r}"),
        candidate_label=kwargs.pop("candidate_label", f"the model after pass {pass_name!r}"),
        **kwargs,
    )


def step_verifier(
    *,
    examples: int = 10,
    seed: int | None = 0,
    keep: str | os.PathLike[str] | None = None,
    clean_up: bool = False,
    **kwargs: Any,
) -> Callable[..., None]:
    """A ``verify(before, after, pass_name, meaning="outputs")`` callable that raises on a change of meaning.

    This is the shape ``qgraph.manager`` takes for ``--verify``; it returns
    one line saying what it proved, which the report's table shows. ``meaning``
    is the pass's declared ``Pass.meaning``: "outputs" compares outputs on
    drawn inputs (:func:`verify_step`); "fp16" runs ``after`` emulated in fp16
    against ``before`` in fp32 (:func:`qgraph.verify.fp16.check_fp16`);
    "sequence" replays token sequences through the cached ``after`` against
    the no-cache ``before`` (docs/design.md, KV-cache I/O contracts), because a
    step that adds a KV cache changes the graph's signature -- or, when
    ``before`` has a cache itself (a conversion between cache forms), through
    both caches on the same tokens; "sampling" (pass ``sampler``) checks that
    greedy ``next_tokens`` are the argmax of ``before``'s logits
    (:mod:`qgraph.verify.sampling`); "approximate"
    (a lossy pass) checks ``after`` against the pass's ``budget``
    (:func:`qgraph.verify.budget.check_budget`). A failure's inputs go to
    ``keep`` when given, else to a temporary folder that is removed when
    ``clean_up`` (see :mod:`qgraph.verify.artifacts`).
    """

    def verify(before: ir.Model, after: ir.Model, pass_name: str, meaning: str = "outputs",
               budget: Any = None) -> str:
        if meaning == "approximate":
            return _verify_budget(before, after, pass_name, budget)
        if meaning == "sequence":
            return _verify_cache_step(before, after, pass_name)
        if meaning == "sampling":  # pass 'sampler': logits -> next_tokens
            from qgraph.verify.sampling import check_greedy_sampler

            return check_greedy_sampler(before, after, examples=examples, seed=seed, pass_name=pass_name)
        if meaning == "fp16":
            from qgraph.verify.fp16 import fp16_step_verifier

            fp16_step_verifier(examples=examples, seed=seed, **kwargs)(before, after, pass_name)
            return f"fp16-emulated outputs match fp32 ({examples} drawn inputs, seed {seed})"
        if meaning == "outputs" and _both_cached(before, after):
            # A KV-cache graph's inputs are tied together (the mask spans past + new columns): drawn one by
            # one, onnxruntime refuses them. Steps of a generation replayed through both caches are the check.
            return _verify_cache_step(before, after, pass_name)
        if meaning == "outputs":
            with artifacts_folder(keep, clean_up, "--verify-keep DIR") as (folder, forget):
                options = dict(kwargs, artifacts_dir=folder) if folder is not None else kwargs
                result = verify_step(before, after, examples=examples, pass_name=pass_name, seed=seed, **options)
                forget(result)
            if not result.equivalent:
                raise NotEquivalentError(result)
            return f"same outputs on {result.examples} drawn inputs (seed {result.seed})"
        else:
            raise PassFailure(f"pass '{pass_name}' declares meaning {meaning!r}, which --verify cannot check",
                              pass_name=pass_name)

    def _both_cached(before: ir.Model, after: ir.Model) -> bool:
        from qgraph.verify.kv_contract import has_kv_cache

        return has_kv_cache(before) and has_kv_cache(after)

    def _verify_budget(before: ir.Model, after: ir.Model, pass_name: str, budget: Any) -> str:
        from qgraph.verify.budget import Budget, check_budget

        budget = budget if budget is not None else Budget()
        result = check_budget(before, after, budget, examples=examples, seed=seed, pass_name=pass_name, **kwargs)
        if not result.within:
            raise PassFailure(f"pass '{pass_name}' went over its approximation budget: {result}", pass_name=pass_name)
        return f"within its approximation budget: {result}"

    def _verify_cache_step(before: ir.Model, after: ir.Model, pass_name: str) -> str:
        from qgraph.verify.kv_contract import has_kv_cache
        from qgraph.verify.sequence import check_sequence_equivalence

        # A graph that had a cache before (optimum's concat form converted to the retained one) has
        # no no-cache graph to compare with: the replay drives both caches on the same tokens.
        reference = "the logits of the input's own cache" if has_kv_cache(before) else "the no-cache logits"
        result = check_sequence_equivalence(
            after, before, examples=examples, seed=seed,
            cached_label=f"the model after pass {pass_name!r}", reference_label=f"the model before pass {pass_name!r}",
        )
        if not result.equivalent:
            raise PassFailure(str(result), pass_name=pass_name)
        if any(v.name == "batch_index" for v in after.graph.inputs) and not has_kv_cache(before):
            # continuous batching: request streams served through the cache rows, each against itself alone
            from qgraph.verify.sequence import SequenceReplayer
            from qgraph.verify.slots import check_slots

            with SequenceReplayer(after, before, cached_label=f"the model after pass {pass_name!r}",
                                  reference_label=f"the model before pass {pass_name!r}") as replayer:
                failure = check_slots(replayer, examples=examples, seed=seed or 0)
            if failure is not None:
                raise PassFailure(f"requests served in the cache rows do not give their logits alone:\n{failure}",
                                  pass_name=pass_name)
            reference += "; request streams in the cache rows give each request's logits alone"
        return f"cached replay gives {reference} ({examples} drawn sequences, seed {seed})"

    return verify



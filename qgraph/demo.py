"""``qgraph demo``: the whole flow on the packaged SmolLM2-135M, told in one screen.

export (dynamo, cached) -> each preset's pipeline (``ort``, ``qaic``) -> the
KV-cached result checked against the export by sequence replay -> text
generated in onnxruntime by the no-cache export and by every cached result,
then a side-by-side table: graph sizes and op changes, what each pass did and
how long it took, TTFT and decode tokens/s, and the generated texts.

Nothing is skipped quietly: a preset that is not registered, a pass it names
that cannot be loaded, a result without a KV cache, a replay that disagrees
-- each stops the demo with a message saying which one.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from qgraph.errors import BadInputError, PassFailure

__all__ = ["DEFAULT_PRESETS", "DEFAULT_PROMPT", "add_demo_parser", "run_demo", "run_demo_command"]

DEMO_MODEL = "smollm2-135m"
DEFAULT_PRESETS = ("ort", "qaic")
DEFAULT_PROMPT = "In a quiet village at the edge of the forest, there lived a"  # 14 SmolLM2 tokens
_MODEL_FILES = {"model.onnx", "model.onnx.data", "export.json"}


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="export SmolLM2-135M, run the presets, verify, generate, and compare",
        description="The main job on the packaged SmolLM2-135M: export -> preset pipelines -> verify -> generate.",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help=f"prompt (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    parser.add_argument("--out", default="out/demo", metavar="DIR", help="where the export and results go (default out/demo)")
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), metavar="NAME",
                        help=f"presets to run (default: {' '.join(DEFAULT_PRESETS)})")
    parser.add_argument("--verify-examples", type=int, default=3, metavar="N",
                        help="sequences replayed against the export per preset (default 3; 0 = skip the check)")
    parser.add_argument("--threads", type=int, default=2, metavar="N", help="onnxruntime intra-op threads (default 2)")
    return parser


@dataclasses.dataclass
class GraphFacts:
    nodes: int
    histogram: dict[str, int]
    opset: int
    cache: str


@dataclasses.dataclass
class Generated:
    label: str
    engine: str
    token_ids: list[int]
    text: str
    stop_reason: str
    stats: Any  # LatencyStats
    load_seconds: float


@dataclasses.dataclass
class PresetRun:
    name: str
    folder: Path
    report: Any  # RunReport
    save_seconds: float
    facts: GraphFacts
    check: str = "not checked"
    check_seconds: float = 0.0
    generated: Generated | None = None


@dataclasses.dataclass
class DemoResult:
    export_dir: Path
    export_seconds: float
    export_from_cache: bool
    export_facts: GraphFacts
    baseline: Generated
    presets: list[PresetRun]


def _say(out: TextIO, message: str) -> None:
    print(f"[demo] {message}", file=out, flush=True)


# --- steps -------------------------------------------------------------------------------------


def check_presets(names: Sequence[str], registry: Any) -> None:
    """Fail before any work if a preset or one of its passes is not available."""
    from qgraph.pipeline import Pipeline

    for name in names:
        try:
            Pipeline.from_preset(name, registry).instantiate(registry)
        except BadInputError as error:
            raise BadInputError(f"the demo runs preset '{name}', which cannot run here: {error}") from None


def graph_facts(model: Any) -> GraphFacts:
    from qgraph.graph_stats import count_nodes, op_histogram
    from qgraph.verify.kv_contract import KVLayoutError, detect_kv_layout

    try:
        layout = detect_kv_layout(model)
        cache = layout.style + (f", ctx_len {layout.ctx_len}" if layout.ctx_len else "")
        if layout.logits_seq == 1:  # generation reads one token's logits a row; the head runs on it alone
            cache += ", last-token logits"
    except KVLayoutError:
        cache = "none"
    return GraphFacts(count_nodes(model.graph), op_histogram(model.graph), model.opset_imports.get("", 0), cache)


def run_preset(name: str, export_dir: Path, out_dir: Path, registry: Any, *,
               options: dict[str, dict[str, Any]] | None = None, label: str | None = None) -> PresetRun:
    """The preset's pipeline on the export (``options``: per pass, as ``--option`` sets them); the result
    (+ tokenizer, sidecars) in ``out_dir/label`` (default: the preset's name)."""
    from qgraph import io
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline

    model = io.load(export_dir / "model.onnx")
    pipeline = Pipeline.from_preset(name, registry)
    if options:
        pipeline.set_options(options)
    report = PassManager(pipeline, registry=registry).run(model)
    facts = graph_facts(model)
    if facts.cache == "none":
        raise PassFailure(f"preset '{name}' gave a graph without a KV cache: the demo needs the kv-cache pass in it "
                          f"(its passes: {', '.join(dict.fromkeys(r.name for r in report.passes))})")
    folder = out_dir / (label or name)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    io.save(model, folder / "model.onnx", external_data=True, protect=[export_dir / "model.onnx"])
    save_seconds = time.perf_counter() - started
    for item in export_dir.iterdir():  # tokenizer, config, generation config
        if item.is_file() and item.name not in _MODEL_FILES:
            shutil.copy2(item, folder / item.name)
    return PresetRun(name, folder, report, save_seconds, facts)


def generate_with(folder: Path, label: str, prompt: str, max_new_tokens: int, threads: int) -> Generated:
    from qgraph.runtime.generate import load_generator

    started = time.perf_counter()
    generator = load_generator(folder, threads=threads)
    load_seconds = time.perf_counter() - started
    generator.generate([prompt], max_new_tokens=2)  # warm-up: the first run allocates, the timed one should not
    result = generator.generate([prompt], max_new_tokens=max_new_tokens)
    return Generated(label, generator.engine.describe(), result.token_ids[0], result.texts[0],
                     result.stop_reasons[0], result.stats, load_seconds)


def run_demo(*, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 32, out_dir: str | Path = "out/demo",
             presets: Sequence[str] = DEFAULT_PRESETS, verify_examples: int = 3, threads: int = 2,
             out: TextIO) -> DemoResult:
    from qgraph import io
    from qgraph.export import Progress, export_model
    from qgraph.registry import default_registry

    if max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not presets:
        raise BadInputError("--presets needs at least one preset")
    registry = default_registry()
    check_presets(presets, registry)
    out_dir = Path(out_dir)

    _say(out, f"1. export {DEMO_MODEL} with the dynamo exporter (cached after the first run)")
    exported = export_model(DEMO_MODEL, out_dir / "export", exporter="dynamo", progress=Progress())
    export_dir = exported.output_dir
    export_facts = graph_facts(io.load(exported.model_path))
    _say(out, f"   {export_dir}: {export_facts.nodes} nodes, {exported.seconds:.1f} s"
              + (" (from the cache)" if exported.from_cache else ""))

    runs: list[PresetRun] = []
    for name in presets:
        _say(out, f"2. preset {name}")
        run = run_preset(name, export_dir, out_dir, registry)
        _say(out, f"   {len(run.report.passes)} pass runs in {run.report.seconds:.1f} s, nodes "
                  f"{run.report.nodes_before} -> {run.report.nodes_after}; saved {run.folder} in {run.save_seconds:.1f} s")
        runs.append(run)

    for run in runs:
        if verify_examples < 1:
            continue
        from qgraph.verify.sequence import check_sequence_equivalence

        _say(out, f"3. verify {run.name}: replay {verify_examples} sequences through the cached graph "
                  "against the export")
        started = time.perf_counter()
        verdict = check_sequence_equivalence(run.folder / "model.onnx", exported.model_path, examples=verify_examples,
                                             threads=threads, cached_label=f"preset {run.name}",
                                             reference_label="the export")
        run.check_seconds = time.perf_counter() - started
        if not verdict.equivalent:
            raise PassFailure(f"preset '{run.name}' changed the model's meaning:\n{verdict}")
        run.check = f"{verify_examples} sequences equal"
        _say(out, f"   {verdict.headline()} ({run.check_seconds:.1f} s)")

    _say(out, f"4. generate {max_new_tokens} tokens from {prompt!r}")
    baseline = generate_with(export_dir, "export (no cache)", prompt, max_new_tokens, threads)
    _say(out, f"   export (no cache): {baseline.stats.decode_tokens_per_second:.1f} decode tokens/s")
    for run in runs:
        run.generated = generate_with(run.folder, run.name, prompt, max_new_tokens, threads)
        _say(out, f"   {run.name}: {run.generated.stats.decode_tokens_per_second:.1f} decode tokens/s")
    return DemoResult(export_dir, exported.seconds, exported.from_cache, export_facts, baseline, runs)


# --- the table -----------------------------------------------------------------------------------


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])])


def _op_changes(before: dict[str, int], after: dict[str, int], limit: int = 6) -> str:
    keys = set(before) | set(after)
    deltas = sorted(((after.get(k, 0) - before.get(k, 0), k) for k in keys), key=lambda d: (-abs(d[0]), d[1]))
    shown = [f"{k} {d:+d}" for d, k in deltas[:limit] if d]
    return ", ".join(shown) or "no change"


def _pass_groups(records: list[Any]) -> list[tuple[str, list[Any]]]:
    """One entry per pass run, except that the rounds of a fixpoint group make one entry."""
    groups: list[tuple[str, list[Any]]] = []
    run: list[Any] = []

    def close() -> None:
        if run:
            names = ", ".join(dict.fromkeys(rec.name for rec in run))
            rounds = max(rec.fixpoint_iteration for rec in run)
            groups.append((f"fixpoint({names}) x{rounds}", list(run)))
            run.clear()

    for rec in records:
        if rec.fixpoint_iteration is None:
            close()
            groups.append((rec.name + (f" (for {rec.prerequisite_of})" if rec.prerequisite_of else ""), [rec]))
        else:
            if rec.fixpoint_iteration == 1 and any(r.name == rec.name for r in run):
                close()  # a second fixpoint group right after the first
            run.append(rec)
    close()
    return groups


def _pass_effect(record: Any) -> str:
    matches = ", ".join(f"{k}={v}" for k, v in record.rule_matches.items() if v)
    if matches:
        return matches
    if record.notes:
        note = record.notes[0]
        return note if len(note) <= 60 else note[:57] + "..."
    return f"{record.name} changed the graph" if record.changed else "-"


def format_demo(result: DemoResult, prompt: str) -> str:
    runs = result.presets
    ex = result.export_facts
    parts = [f"qgraph demo: {DEMO_MODEL} ({result.export_dir}), prompt {prompt!r}", ""]

    header = ["", "export", *(r.name for r in runs)]
    rows = [header,
            ["nodes", str(ex.nodes), *(str(r.facts.nodes) for r in runs)],
            ["op types", str(len(ex.histogram)), *(str(len(r.facts.histogram)) for r in runs)],
            ["opset", str(ex.opset), *(str(r.facts.opset) for r in runs)],
            ["KV cache", ex.cache, *(r.facts.cache for r in runs)],
            ["pipeline seconds", f"{result.export_seconds:.1f} (export)", *(f"{r.report.seconds:.1f}" for r in runs)],
            ["check vs export", "-", *(r.check for r in runs)]]
    parts += ["Graphs", _table(rows), ""]
    for r in runs:
        parts.append(f"  ops {r.name}: {_op_changes(ex.histogram, r.facts.histogram)}")
    parts.append("")

    for r in runs:
        rows = [["pass", "seconds", "nodes", "what it did"]]
        for name, records in _pass_groups(r.report.passes):
            effects = "; ".join(e for e in (_pass_effect(rec) for rec in records) if e != "-") or "-"
            rows.append([name, f"{sum(rec.seconds for rec in records):.2f}",
                         f"{records[0].nodes_before} -> {records[-1].nodes_after}", effects])
        parts += [f"Passes of preset {r.name} ({r.report.seconds:.1f} s)", _table(rows, right={1}), ""]

    gens = [result.baseline, *(r.generated for r in runs if r.generated is not None)]
    reference = result.baseline.token_ids
    rows = [["", *(g.label for g in gens)],
            ["engine", *(g.engine.split(" (")[0] for g in gens)],
            ["session load s", *(f"{g.load_seconds:.1f}" for g in gens)],
            ["TTFT ms", *(f"{1000 * g.stats.ttft:.1f}" for g in gens)],
            ["prefill tokens/s", *(f"{g.stats.prefill_tokens_per_second:.0f}" for g in gens)],
            ["decode tokens/s", *(f"{g.stats.decode_tokens_per_second:.1f}" for g in gens)],
            ["end-to-end s", *(f"{g.stats.end_to_end:.2f}" for g in gens)],
            ["tokens", *(f"{len(g.token_ids)} ({g.stop_reason})" for g in gens)],
            ["same tokens as no-cache", "-", *(_same(reference, g.token_ids) for g in gens[1:])]]
    parts += [f"Generation ({result.baseline.stats.prompt_tokens} prompt tokens, greedy, onnxruntime CPU)",
              _table(rows, right=set(range(1, len(gens) + 1))), ""]
    for g in gens:
        parts.append(f"{g.label}: {prompt}{g.text}")
    return "\n".join(parts)


def _same(reference: list[int], tokens: list[int]) -> str:
    if tokens == reference:
        return "yes"
    common = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), min(len(reference), len(tokens)))
    return f"first {common}"


def run_demo_command(args: argparse.Namespace, out: TextIO) -> int:
    if args.threads < 1:
        raise BadInputError(f"--threads must be at least 1, got {args.threads}")
    result = run_demo(prompt=args.prompt, max_new_tokens=args.max_new_tokens, out_dir=args.out, presets=args.presets,
                      verify_examples=args.verify_examples, threads=args.threads, out=out)
    print(file=out)
    print(format_demo(result, args.prompt), file=out)
    return 0

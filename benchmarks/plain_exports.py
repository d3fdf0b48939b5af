"""The presets on *plain* exports of SmolLM2-135M: what a user's own ``torch.onnx.export`` gives.

    .venv/bin/python benchmarks/plain_exports.py [--exporters torchscript dynamo] [--exports DIR]
                                                [--max-new-tokens N] [--repeat N] [--write] [--note TEXT]

A plain export traces ``AutoModelForCausalLM`` called with ``input_ids`` and
``attention_mask`` only (``qgraph export smollm2-135m --wrapper plain``, the
same trace as ``torch.onnx.export(model, (input_ids, attention_mask))``): the
model counts positions itself, so the kv-cache pass has to find where the
graph reads them. For each exporter, in fresh processes:

* the ``ort`` and ``qaic`` presets run as ``qgraph optimize`` runs them
  (invariant checks on); the pipeline time is the pass manager's run, with
  the kv-cache pass's own share, median of ``--repeat`` runs, and how many
  layers ``lower-gqa`` took (``ort``; SmolLM2 has 30);
* the no-cache export and both cached graphs generate greedily from the
  same prompt; the tokens must be identical.

``--exports DIR`` takes ``DIR/smollm2-plain-<exporter>/model.onnx`` instead of
exporting (a dynamo export of SmolLM2 takes minutes here; qgraph's export
cache keeps it after the first time).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import benchmark_parser, in_child, peak_rss_mib, ran_as_child
from results_file import machine_description, publish

SECTION = "Presets on plain exports"
MODEL = "smollm2-135m"
PROMPT = "The capital of France is"


def _plain_export(exporter: str, exports: Path | None) -> Path:
    if exports is not None:
        path = exports / f"smollm2-plain-{exporter}" / "model.onnx"
        if not path.exists():
            raise SystemExit(f"{path}: not found (make it with `qgraph export {MODEL} --wrapper plain "
                             f"--exporter {exporter} -o {path.parent}`)")
        return path
    from qgraph.export.frontend import export_model
    from qgraph.export.progress import Progress

    out = Path(tempfile.mkdtemp(prefix="qgraph-bench-")) / f"smollm2-plain-{exporter}"
    return Path(export_model(MODEL, out, exporter=exporter, wrapper="plain", progress=Progress()).model_path)


def child(task: dict[str, Any]) -> dict[str, Any]:
    from qgraph.demo import run_preset
    from qgraph.registry import default_registry
    from qgraph.runtime.generate import load_generator

    export_dir = Path(task["model"]).parent
    if task["kind"] == "pipeline":
        with tempfile.TemporaryDirectory() as out:
            run = run_preset(task["preset"], export_dir, Path(out), default_registry())
            seconds = sum(r.seconds for r in run.report.passes)
            kv = sum(r.seconds for r in run.report.passes if r.name == "kv-cache")
            notes = [n for r in run.report.passes if r.name == "kv-cache" for n in r.notes]
            gqa = sum(r.rule_matches.get("group-query-attention", 0) for r in run.report.passes)
            return {"seconds": seconds, "kv_seconds": kv, "notes": notes, "rss": peak_rss_mib(), "gqa": gqa}
    folder = Path(task["folder"]) if task.get("folder") else export_dir
    generator = load_generator(folder, threads=2)
    result = generator.generate([PROMPT], max_new_tokens=task["tokens"])
    return {"ids": [int(t) for t in result.token_ids[0]], "text": result.texts[0]}


def main() -> None:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"])
    parser.add_argument("--exports", type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if ran_as_child(args, child):
        return
    script = str(Path(__file__).resolve())
    rows, texts, mismatches = [], [], []
    for exporter in args.exporters:
        model = _plain_export(exporter, args.exports)
        reference = in_child(script, {"kind": "generate", "model": str(model), "tokens": args.max_new_tokens})
        texts.append(f"- {exporter}, no-cache export: {reference['text']!r}")
        for preset in ("ort", "qaic"):
            runs = [in_child(script, {"kind": "pipeline", "model": str(model), "preset": preset})
                    for _ in range(args.repeat)]
            with tempfile.TemporaryDirectory() as out:
                from qgraph.demo import run_preset
                from qgraph.registry import default_registry

                folder = run_preset(preset, model.parent, Path(out), default_registry()).folder
                cached = in_child(script, {"kind": "generate", "model": str(model), "folder": str(folder),
                                           "tokens": args.max_new_tokens})
            same = cached["ids"] == reference["ids"]
            if not same:
                mismatches.append(f"{exporter}/{preset}")
            seconds = sorted(r["seconds"] for r in runs)
            kv = statistics.median(r["kv_seconds"] for r in runs)
            rows.append(f"| {exporter} | {preset} | {statistics.median(seconds):.2f} s [{seconds[0]:.2f}–{seconds[-1]:.2f}]"
                        f" | {kv:.2f} s | {runs[0]['gqa'] if preset == 'ort' else '-'} | {max(r['rss'] for r in runs):.0f} MiB"
                        f" | {'yes' if same else '**no**'} |")
            print(rows[-1], file=sys.stderr)
        positions = [n for n in runs[0]["notes"] if "position" in n]
        texts.append(f"- {exporter}, what kv-cache found: " + " / ".join(positions[:2]))
    lines = [
        f"`.venv/bin/python benchmarks/plain_exports.py{' --exports ' + str(args.exports) if args.exports else ''}"
        f" --write`, {time.strftime('%Y-%m-%d')}; {machine_description()}.",
        "",
        f"Plain exports of {MODEL} (`qgraph export {MODEL} --wrapper plain`, the trace of "
        "`torch.onnx.export(model, (input_ids, attention_mask))`). Pipeline: the preset as `qgraph optimize` runs "
        f"it, median of {args.repeat} fresh processes [range]; tokens: {args.max_new_tokens} greedy tokens from "
        f"{PROMPT!r}, cached graph vs the no-cache export.",
        "",
        "| export | preset | pipeline | of it kv-cache | layers on GroupQueryAttention | peak RSS | same tokens |",
        "|---|---|---:|---:|---:|---:|---|",
        *rows,
        "",
        *texts,
    ]
    if args.note:
        lines += ["", args.note]
    publish(SECTION, "\n".join(lines), args.write)
    if mismatches:
        raise SystemExit(f"tokens differ from the no-cache export: {', '.join(mismatches)}")


if __name__ == "__main__":
    main()

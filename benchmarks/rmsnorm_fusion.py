"""RMSNorm fusion on the real SmolLM2-135M exports: qgraph's rmsnorm pass beside onnxscript's fusions.

    .venv/bin/python benchmarks/rmsnorm_fusion.py [--exporters torchscript dynamo] [--exports DIR]
                                                 [--write] [--note TEXT]

SmolLM2-135M is a 30-layer Llama: 2 RMSNorms per layer + 1 final = 61. For
each export (``qgraph.export.export_model`` with the default cache, or
``--exports DIR/smollm2-<exporter>/model.onnx``) three jobs run, each in a
fresh Python process on the same file, timed around the call (loading the
file apart):

* qgraph: ``qgraph.optimize_with_report(model, ["rmsnorm"])`` -- the pass and
  the prerequisites the manager runs for it on a raw export (opset-upgrade to
  23; shape-inference for the untyped TorchScript graph), invariant checks
  included. Counted: RMSNormalization nodes in the result.
* onnxscript ``optimize_for_ort`` (``onnxscript.rewriter.ort_fusions``), the
  usual way to get its RMSNorm fusion, which it runs among all its ORT
  fusions. Counted: its ``rms_normalization`` fusion count
  (SimplifiedLayerNormalization).
* onnxscript's opset-23 RMSNormalization rules alone
  (``onnxscript.rewriter.rules.fusion._rms_normalization.fuse_rms_normalization``)
  after onnxscript's version converter to 23, both inside the timing.

``--write`` replaces the "RMSNorm fusion" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from harness import benchmark_parser, exported, in_child, ran_as_child
from results_file import machine_description, publish

SECTION = "RMSNorm fusion"
MODEL = "smollm2-135m"
EXPECTED = 61
EXPORTERS = ("torchscript", "dynamo")
JOBS = ("qgraph", "onnxscript-ort", "onnxscript-onnx23")


def child(task: dict[str, Any]) -> dict[str, Any]:
    import onnx_ir as ir

    model = ir.load(task["model"])
    nodes_before = len(model.graph)
    if task["job"] == "qgraph":
        import qgraph

        start = time.perf_counter()
        model, report = qgraph.optimize_with_report(model, ["rmsnorm"])
        seconds = time.perf_counter() - start
        passes = {(p.prerequisite_of and f"{p.name} (prerequisite)") or p.name: p.seconds for p in report.passes}
        fused = report.passes[-1].op_histogram.get("RMSNormalization", 0)
        return {"seconds": seconds, "fused": fused, "nodes_before": nodes_before, "nodes_after": len(model.graph),
                "passes": passes, "notes": report.passes[-1].notes[:3]}
    if task["job"] == "onnxscript-ort":
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        start = time.perf_counter()
        model, fusions = optimize_for_ort(model)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "fused": fusions.get("rms_normalization", 0), "nodes_before": nodes_before,
                "nodes_after": len(model.graph)}
    from onnxscript.rewriter.rules.fusion._rms_normalization import (
        fuse_rms_normalization,
    )
    from onnxscript.version_converter import convert_version

    start = time.perf_counter()
    convert_version(model, target_version=23, fallback=True)
    fused = fuse_rms_normalization(model)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "fused": fused, "nodes_before": nodes_before, "nodes_after": len(model.graph)}


_LABELS = {
    "qgraph": "qgraph `rmsnorm` (+ prerequisites)",
    "onnxscript-ort": "onnxscript `optimize_for_ort` (all ORT fusions)",
    "onnxscript-onnx23": "onnxscript opset-23 RMSNormalization rules (+ version converter)",
}


def format_report(rows: list[dict], note: str = "") -> str:
    lines = [
        "Command: `.venv/bin/python benchmarks/rmsnorm_fusion.py --write [--exports DIR] [--note TEXT]`",
        "",
        f"Machine: {machine_description()}.",
        "",
        f"SmolLM2-135M (30 layers: {EXPECTED} RMSNorms). Each job runs in a fresh process on the same export; "
        "seconds are the call alone (loading the file apart). *fused* = RMSNorms replaced by one op.",
        "",
        "| export | job | seconds | fused | nodes before -> after |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['exporter']} | {_LABELS[r['job']]} | {r['seconds']:.2f} | {r['fused']} / {EXPECTED} | "
                     f"{r['nodes_before']} -> {r['nodes_after']} |")
    lines.append("")
    for r in rows:
        if r["job"] == "qgraph":
            parts = ", ".join(f"{name} {s:.2f} s" for name, s in r["passes"].items())
            lines.append(f"- qgraph on the {r['exporter']} export, per pass: {parts}")
    if note:
        lines += ["", note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=EXPORTERS)
    parser.add_argument("--exports", type=Path, help="use DIR/smollm2-<exporter>/model.onnx instead of exporting")
    args = parser.parse_args(argv)
    if ran_as_child(args, child):
        return 0

    rows = []
    for exporter in args.exporters:
        path = exported(MODEL, exporter, args.exports, f"smollm2-{exporter}")
        for job in JOBS:
            print(f"{exporter}: {job} ...", file=sys.stderr)
            row = in_child(__file__, {"job": job, "model": str(path)})
            row.update(exporter=exporter, job=job)
            rows.append(row)
    report = format_report(rows, args.note)
    publish(SECTION, report, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

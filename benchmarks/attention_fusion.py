"""Attention fusion on the real packaged models: qgraph's pass beside onnxscript's optimize_for_ort.

    .venv/bin/python benchmarks/attention_fusion.py [--exports DIR] [--runs N] [--write]

For SmolLM2-135M (30 layers, GQA 9/3) with both exporters and
all-minilm-l6-v2 (6 layers) with both exporters, in the same run:

1. ``qgraph`` pass ``attention`` (with the opset-upgrade it brings in) on a
   freshly loaded model: seconds and the number of fused ``Attention``
   nodes (30 and 6 expected);
2. ``onnxscript.rewriter.ort_fusions.optimize_for_ort`` on another fresh
   load of the same file: seconds and the number of attention nodes it
   fused (com.microsoft Attention/MultiHeadAttention/GroupQueryAttention);
3. onnxruntime latency (default graph optimizations, 1 thread per op set by
   the machine) of a 128-token prefill, batch 1: the export as it is vs
   the model after the ``attention`` pass, median of ``--runs`` runs.

The exports come from ``qgraph.export.export_model`` through the default
cache (so a fresh machine exports them once); ``--exports DIR`` reads
``DIR/{smollm2,minilm}-{exporter}/model.onnx`` instead (pre-made exports).
``--write`` replaces the "Attention fusion" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import machine_description, publish

SECTION = "Attention fusion"
MODELS = {"smollm2": ("smollm2-135m", 30), "minilm": ("all-minilm-l6-v2", 6)}
EXPORTERS = ("dynamo", "torchscript")
PREFILL = 128


def _export(model: str, exporter: str, exports: Path | None, scratch: Path) -> Path:
    short = next(k for k, (name, _) in MODELS.items() if name == model)
    if exports is not None:
        return exports / f"{short}-{exporter}" / "model.onnx"
    from qgraph.export.frontend import export_model

    return Path(export_model(model, scratch / f"{short}-{exporter}", exporter=exporter).model_path)


def _ours(path: Path, out: Path) -> tuple[float, int]:
    import onnx_ir as ir

    import qgraph

    model = ir.load(path)
    start = time.perf_counter()
    fused, _ = qgraph.optimize_with_report(model, ["attention"])
    seconds = time.perf_counter() - start
    count = sum(1 for n in fused.graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx"))
    ir.save(fused, out, external_data=out.name + ".data")
    return seconds, count


def _onnxscript(path: Path) -> tuple[float, int]:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(path)
    start = time.perf_counter()
    optimize_for_ort(model)
    seconds = time.perf_counter() - start
    kinds = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
    count = sum(1 for n in model.graph if n.op_type in kinds and n.domain == "com.microsoft")
    return seconds, count


def _latency_ms(path: Path, runs: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = (np.arange(PREFILL, dtype=np.int64) % 200 + 3)[None, :]
        else:  # attention_mask, token_type_ids
            value = 1 if spec.name == "attention_mask" else 0
            feeds[spec.name] = np.full((1, PREFILL), value, np.int64)
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", type=Path, help="read pre-made exports from DIR/<model>-<exporter>/")
    parser.add_argument("--runs", type=int, default=10, help="timed onnxruntime runs per model")
    parser.add_argument("--write", action="store_true", help="write the RESULTS.md section")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="qgraph-attention-bench-") as tmp:
        scratch = Path(tmp)
        for short, (model, layers) in MODELS.items():
            for exporter in EXPORTERS:
                path = _export(model, exporter, args.exports, scratch)
                fused_path = scratch / f"{short}-{exporter}-fused.onnx"
                ours_s, ours_n = _ours(path, fused_path)
                gc.collect()
                theirs_s, theirs_n = _onnxscript(path)
                gc.collect()
                before = _latency_ms(path, args.runs)
                after = _latency_ms(fused_path, args.runs)
                row = {"model": model, "exporter": exporter, "layers": layers, "ours_s": ours_s,
                       "ours_n": ours_n, "theirs_s": theirs_s, "theirs_n": theirs_n,
                       "before_ms": before, "after_ms": after}
                print(row, flush=True)
                rows.append(row)
    report = format_report(rows, args.runs)
    publish(SECTION, report, args.write)
    return 0 if all(r["ours_n"] == r["layers"] for r in rows) else 1


def format_report(rows: list[dict], runs: int) -> str:
    lines = [
        machine_description(),
        "",
        (
            "`.venv/bin/python benchmarks/attention_fusion.py --write`: qgraph's `attention` pass (incl. the "
            "opset upgrade to 23 it brings in) and onnxscript's `optimize_for_ort` on the same exports in the "
            f"same run; onnxruntime CPU latency of one {PREFILL}-token prefill (batch 1, median of {runs})."
        ),
        "",
        (
            "| model | exporter | layers | qgraph `attention` | fused | onnxscript `optimize_for_ort` | fused "
            "| ORT latency export | ORT latency fused |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['exporter']} | {r['layers']} | {r['ours_s']:.1f} s | {r['ours_n']} | "
            f"{r['theirs_s']:.1f} s | {r['theirs_n']} | {r['before_ms']:.1f} ms | {r['after_ms']:.1f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

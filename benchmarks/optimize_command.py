"""The whole `qgraph optimize` command on the dynamo SmolLM2-135M export: where its seconds go.

    .venv/bin/python benchmarks/optimize_command.py [--preset ort] [--exports DIR] [--repeat N] [--write] [--note TEXT]

Each run is a fresh process (``python -m qgraph.cli optimize IN -o OUT
--preset P``), timed from outside: interpreter start, imports, load, passes,
invariant checks and the atomic save with its fsyncs all count. A second
series runs the same steps through the API in a fresh process with a clock
between them (imports, ``io.load``, the pass manager, ``io.save``), which is
where the time goes. The issue's target for ``--preset ort``: at most 2 s.
CPU seconds (user + sys of the child) are reported beside wall seconds: on a
machine shared with other jobs wall time is mostly waiting for a core.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from harness import benchmark_parser, exported, in_child, ran_as_child  # noqa: E402
from results_file import machine_description, publish  # noqa: E402

SECTION = "qgraph optimize, the whole command"


def _phases(task: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    from qgraph import io
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline
    from qgraph.registry import default_registry

    imported = time.perf_counter()
    model = io.load(task["input"])
    loaded = time.perf_counter()
    registry = default_registry()
    PassManager(Pipeline.from_preset(task["preset"], registry), registry=registry).run(model)
    passed = time.perf_counter()
    io.save(model, task["output"], external_data=True, protect=[task["input"]])
    saved = time.perf_counter()
    return {"import": imported - started, "load": loaded - imported, "passes": passed - loaded,
            "save": saved - passed}


def _command(source: Path, output: Path, preset: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qgraph.cli", "optimize", str(source), "-o", str(output),
                    "--preset", preset], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--preset", default="ort")
    parser.add_argument("--exports", type=Path, help="folder holding smollm2-dynamo/model.onnx")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if ran_as_child(args, _phases):
        return
    source = exported("smollm2-135m", "dynamo", args.exports, "smollm2-dynamo")
    out = Path(tempfile.mkdtemp(prefix="qgraph-optimize-bench-"))
    walls, cpus, phases = [], [], []
    for i in range(args.repeat):
        wall, cpu = _command(source, out / f"cli{i}.onnx", args.preset)
        walls.append(wall)
        cpus.append(cpu)
        phases.append(in_child(__file__, {"input": str(source), "output": str(out / f"api{i}.onnx"),
                                          "preset": args.preset}))
        for p in out.iterdir():
            p.unlink()

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    weights = sum(p.stat().st_size for p in source.parent.glob("model.onnx*")) / 2**20
    report = "\n".join([
        f"`.venv/bin/python benchmarks/optimize_command.py --preset {args.preset}"
        f"{' --exports ' + str(args.exports) if args.exports else ''}`: `qgraph optimize IN -o OUT --preset "
        f"{args.preset}` on the dynamo SmolLM2-135M export ({weights:.0f} MiB with its external data), each run a "
        f"fresh process; median of {args.repeat} [range]. Target: <= 2 s.",
        "",
        machine_description(("onnx", "onnxruntime", "onnx-ir", "onnxscript")),
        "",
        "| command wall s | command CPU s | import s | load s | passes s | save s |",
        "|---|---|---|---|---|---|",
        f"| {median(walls)} | {median(cpus)} | {median([p['import'] for p in phases])} | "
        f"{median([p['load'] for p in phases])} | {median([p['passes'] for p in phases])} | "
        f"{median([p['save'] for p in phases])} |",
    ])
    if args.note:
        report += f"\n\n{args.note}"
    publish(SECTION, report, args.write)


if __name__ == "__main__":
    main()

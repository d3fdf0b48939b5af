"""The ``ort`` preset with and without issue 19's fusions, interleaved in one process, on the dynamo SmolLM2 export.

    .venv/bin/python benchmarks/ort_preset_time.py [--export PATH] [--rounds 3]

On a shared machine a wall-clock figure says more about the neighbours than
about the passes, so the two pipelines run alternately on fresh loads of the
same file and both wall and CPU (process) time are printed per round, with
the slowest passes. *before* is the preset as it was (cleanup, rmsnorm,
attention, kv-cache concat, cleanup); *after* is ``ORT`` as shipped.
Invariant checks on, as the CLI runs it; load and save apart.
"""

from __future__ import annotations

import argparse
import copy
import time


def main(argv: list[str] | None = None) -> int:
    from qgraph import io
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline
    from qgraph.registry import default_registry
    from qgraph_passes import presets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", default="/work/exports/smollm2-dynamo/model.onnx")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    registry = default_registry()
    before = {"steps": [*presets._CANONICALIZE, {"pass": "kv-cache", "options": {"style": "concat"}}, *presets._FINISH]}
    for _ in range(args.rounds):
        for label, spec in (("before", before), ("after", presets.ORT)):
            model = io.load(args.export)
            wall, cpu = time.perf_counter(), time.process_time()
            report = PassManager(Pipeline(copy.deepcopy(spec["steps"])), registry=registry).run(model)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            per: dict[str, float] = {}
            for record in report.passes:
                per[record.name] = per.get(record.name, 0.0) + record.seconds
            slow = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:6])
            print(f"{label:6s} wall {wall:.2f} s  cpu {cpu:.2f} s  nodes {len(list(model.graph))}  ({slow})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

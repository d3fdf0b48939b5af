"""The whole ``ort`` preset against the number of layers, on synthetic decoders of 8 to 128 layers.

    .venv/bin/python benchmarks/ort_preset_scaling.py [--layers 8 32 128] [--repeats 3] [--write]

Issue 19's budget: with its fusions the ``ort`` preset stays linear in depth.
Each size is a fresh ``qgraph.synthetic`` decoder (dynamo-exporter op
patterns: rotary halves, separate Q/K/V and gate/up projections, pre-norm
residuals; opset 23, a padding mask) run through the ``ort`` preset under the
pass manager with invariant checks off, so each figure is the passes' own.
Seconds per pass name (summed over its runs in the pipeline, e.g. the
cleanup fixpoint), best of ``--repeats``. The fusions' match counts are
checked against the layer count (2 rotations, one Q/K/V and one gate/up
pack, one attention rewritten three ways, 2 residual norms per layer), so a
pass that got faster by matching less is caught. Budget: a pass's time at
the largest size at most 20x its time at the smallest (16x the nodes); exit
status 1 when exceeded.

``--clock cpu`` (the default) times each pass with the process's CPU clock:
on a machine shared with other jobs a pass's wall seconds measure how long
it waited for a core (a run at load 4 on 2 cores showed 4x the CPU time as
wall time, and per-pass wall ratios from 11x to 31x for one and the same
linear preset). ``--clock wall`` gives the pass manager's own wall figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from collections.abc import Iterator

from results_file import RESULTS, machine_description, publish

SECTION = "ort preset scaling"
BUDGET = 20.0
TOTAL = "whole preset"


@contextlib.contextmanager
def _cpu_per_pass() -> Iterator[dict[str, float]]:
    """CPU seconds of every pass called inside, summed by pass name."""
    from qgraph.pass_base import Pass

    seconds: dict[str, float] = {}
    original = Pass.__call__

    def timed(self, model):  # noqa: ANN001, ANN202 - the pass's own signature
        start = time.process_time()
        try:
            return original(self, model)
        finally:
            seconds[self.name] = seconds.get(self.name, 0.0) + time.process_time() - start

    Pass.__call__ = timed
    try:
        yield seconds
    finally:
        Pass.__call__ = original


def measure(layers: int, clock: str = "cpu") -> tuple[int, dict[str, float], dict[str, int]]:
    from qgraph.graph_stats import count_nodes
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline
    from qgraph.synthetic import synthetic_decoder
    from qgraph_passes.presets import ORT

    model = synthetic_decoder(layers, opset=23, mask="padding")
    nodes = count_nodes(model.graph)
    with _cpu_per_pass() as cpu:
        report = PassManager(Pipeline(copy.deepcopy(ORT["steps"])), check_invariants=False).run(model)
    seconds: dict[str, float] = dict(cpu) if clock == "cpu" else {}
    matches: dict[str, int] = {}
    for p in report.passes:
        if clock == "wall":
            seconds[p.name] = seconds.get(p.name, 0.0) + p.seconds
        for rule, n in p.rule_matches.items():
            matches[rule] = matches.get(rule, 0) + n
    seconds[TOTAL] = sum(seconds.values())
    return nodes, seconds, matches


def expected_matches(layers: int) -> dict[str, int]:
    return {"rotary-half": 2 * layers, "pack-three-matmuls": layers, "pack-two-matmuls": layers,
            "attention-cache-inputs": layers, "rotary-packed-heads": 2 * layers, "attention-packed-heads": layers,
            "skip-rmsnorm": 2 * layers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of {RESULTS.name}")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time each pass by the process's CPU clock (default) or the wall clock")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    rows = []
    for layers in args.layers:
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            nodes, seconds, matches = measure(layers, args.clock)
            for name, s in seconds.items():
                best[name] = min(best.get(name, s), s)
        for rule, want in expected_matches(layers).items():
            if matches.get(rule, 0) != want:
                raise SystemExit(f"{layers} layers: {rule} matched {matches.get(rule, 0)}, expected {want}")
        rows.append((layers, nodes, best))
        print(f"{layers} layers, {nodes} nodes: " + ", ".join(f"{k} {v:.3f}s" for k, v in best.items()), file=sys.stderr)

    first, last = rows[0], rows[-1]
    names = [n for n in last[2] if last[2][n] >= 0.005 or n == TOTAL]
    ratios = {n: last[2][n] / max(first[2].get(n, 0.0), 1e-4) for n in names}
    lines = [
        f"Command: `.venv/bin/python benchmarks/ort_preset_scaling.py --repeats {args.repeats}"
        f"{' --clock wall' if args.clock == 'wall' else ''} --write`", "",
        f"Machine: {machine_description()}.", "",
        "Synthetic Llama-shaped decoders (opset 23) through the whole `ort` preset, invariant checks off; "
        f"{'CPU' if args.clock == 'cpu' else 'wall'} seconds "
        f"per pass (summed over its runs in the pipeline), best of {args.repeats}; passes under 5 ms at the "
        "largest size left out. Fusion match counts checked against the layer count.", "",
        "| layers | nodes | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for layers, nodes, best in rows:
        lines.append(f"| {layers} | {nodes} | " + " | ".join(f"{best.get(n, 0.0):.3f}" for n in names) + " |")
    lines.append(f"| ratio {last[0]}/{first[0]} layers | {last[1] / first[1]:.1f}x | "
                 + " | ".join(f"{ratios[n]:.1f}x" for n in names) + " |")
    over = [n for n in names if ratios[n] > BUDGET]
    lines += ["", f"Budget: at most {BUDGET:.0f}x from the smallest to the largest size (linear in nodes): "
              + ("**exceeded by " + ", ".join(over) + "**" if over else "met by every pass") + "."]
    if args.note:
        lines += ["", args.note]
    publish(SECTION, "\n".join(lines), args.write)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())

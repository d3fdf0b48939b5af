"""Decode step time of SmolLM2-135M: ``ort-attention`` (Attention, concat cache) against ``ort`` (GroupQueryAttention, shared buffer).

    .venv/bin/python benchmarks/gqa_shared_buffer.py [--contexts 16,512,2048] [--steps 16] [--rounds 3]
                                                    [--precision fp32|int4] [--out DIR] [--write] [--note TEXT]

What ``lower-gqa`` changes at run time, measured alone: both graphs come
from the same dynamo export through the presets ``ort-attention`` and ``ort``
(``ort-int4-attention`` / ``ort-int4`` with ``--precision int4``), run as
``qgraph generate`` runs them (:func:`qgraph.runtime.engines.make_engine`:
the concat graph feeds ``present`` back as the next ``past``, a new buffer
each step; the lowered graph binds past and present to one buffer). For
each context length c, each graph prefills c random tokens, then runs
``--steps`` one-token decode steps, each timed. The two graphs alternate
step by step (concat, lowered, concat, ...; every other round starts with
the lowered one) in one process with 2 threads, so load on a shared
machine reaches both alike; the table gives
the median step time of each and their ratio. Greedy tokens of the two
must agree at fp32 (the benchmark fails otherwise); at int8/int4 their
agreement is reported.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import benchmark_parser, interleaved_decode
from results_file import machine_description, publish

SECTION = "GroupQueryAttention and the shared cache buffer"
MODEL = "smollm2-135m"
THREADS = 2


def _graphs(out: Path, precision: str) -> dict[str, Path]:
    from qgraph.demo import run_preset
    from qgraph.export import Progress, export_model
    from qgraph.registry import default_registry

    exported = export_model(MODEL, out / "export", exporter="dynamo", progress=Progress())
    presets = ("ort-attention", "ort") if precision == "fp32" else (f"ort-{precision}-attention", f"ort-{precision}")
    graphs = {}
    for preset in presets:
        folder = out / "qgraph" / preset
        if not (folder / "model.onnx").exists():
            print(f"preset {preset} ...", file=sys.stderr)
            run_preset(preset, exported.output_dir, out / "qgraph", default_registry())
        graphs[preset] = folder / "model.onnx"
    return graphs


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--contexts", default="16,512,2048")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int4", "int8"))
    parser.add_argument("--out", metavar="DIR", help="keep (and reuse) the export and the graphs here")
    args = parser.parse_args(argv)
    from qgraph.runtime.engines import make_engine

    with tempfile.TemporaryDirectory(prefix="qgraph-gqa-") as scratch:
        graphs = _graphs(Path(args.out) if args.out else Path(scratch), args.precision)
        engines = {name: make_engine(path, threads=THREADS) for name, path in graphs.items()}
        names = list(engines)
        rng = np.random.default_rng(0)
        rows = []
        for context in (int(c) for c in args.contexts.split(",")):
            prompt = rng.integers(0, 49152, size=(1, context))
            times: dict[str, list[float]] = {n: [] for n in names}
            tokens: dict[str, list[int]] = {}
            for round_ in range(args.rounds):
                print(f"context {context}, round {round_ + 1} ...", file=sys.stderr)
                _, got, tokens = interleaved_decode(engines, prompt, args.steps, flip=bool(round_ % 2))
                for name in names:
                    times[name] += got[name]
            same = sum(a == b for a, b in zip(tokens[names[0]], tokens[names[1]]))
            if args.precision == "fp32" and same != len(tokens[names[0]]):
                raise SystemExit(f"greedy tokens differ at context {context}: {tokens}")
            medians = {n: 1000 * statistics.median(times[n]) for n in names}
            rows.append((context, medians[names[0]], medians[names[1]], f"{same}/{len(tokens[names[0]])}"))
        kinds = {n: engines[n].kind for n in names}
    lines = [
        f"Command: `.venv/bin/python benchmarks/gqa_shared_buffer.py --contexts {args.contexts} --steps {args.steps} "
        f"--rounds {args.rounds} --precision {args.precision} --write`",
        "",
        f"Machine: {machine_description()}.",
        "",
        (f"SmolLM2-135M ({args.precision}), dynamo export; `{names[0]}` ({kinds[names[0]]}) against `{names[1]}` "
         f"({kinds[names[1]]}), {THREADS} threads, one process, decode steps alternating between the two; median of "
         f"{args.rounds} x {args.steps} decode steps after a prompt of c random tokens (greedy tokens must agree at fp32; at int4 the int8 "
         "activations of accuracy_level 4 can turn the attention kernels' last-bit differences into another "
         "near-tie winner)."),
        "",
        f"| context c | {names[0]} ms/step | {names[1]} ms/step | {names[1]} / {names[0]} | same greedy tokens |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {c} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {same} |" for c, a, b, same in rows]
    if args.note:
        lines += ["", args.note]
    publish(SECTION, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

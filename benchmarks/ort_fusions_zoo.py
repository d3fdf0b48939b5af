"""The ``ort`` preset's fusions across the tiny zoo, both exporters: what fused, and sequence replay.

    .venv/bin/python benchmarks/ort_fusions_zoo.py [--archs llama phi ...] [--exporters dynamo torchscript]
                                                  [--write] [--note TEXT]

For every causal-LM architecture of the zoo (``qgraph.export.zoo``, 2 layers)
and both exporters, the ``ort`` preset runs on the export as ``qgraph demo``
runs it; the table counts what its fusions made (RotaryEmbedding, with how
many are partial and interleaved; packed MatMuls: groups of three and of
two; SkipSimplifiedLayerNormalization), lists the
notes of the fusion passes (every candidate a rule refused, with the check
that failed) and replays drawn token sequences through the cached graph
against the no-cache export (``qgraph.verify.sequence``: prefill and decode
chunks, padded batches; greedy tokens required equal). ``--write`` replaces
the "ort fusions across the zoo" section of RESULTS.md.
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

from harness import benchmark_parser
from results_file import machine_description, publish

SECTION = "ort fusions across the zoo"
FUSION_PASSES = ("rotary", "pack-matmuls", "skip-rmsnorm", "lower-gqa")


def run_one(arch: str, exporter: str, scratch: Path) -> dict:
    import onnx

    from qgraph import io
    from qgraph.export.zoo import export_tiny
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline
    from qgraph.registry import default_registry
    from qgraph.verify.sequence import check_sequence_equivalence

    exported = export_tiny(arch, exporter, scratch / "exports")
    model = io.load(exported.model_path)
    registry = default_registry()
    started = time.perf_counter()
    report = PassManager(Pipeline.from_preset("ort", registry), registry=registry).run(model)
    seconds = time.perf_counter() - started
    out = scratch / f"{arch}-{exporter}" / "model.onnx"
    out.parent.mkdir(parents=True)
    io.save(model, out)
    nodes = onnx.load(out, load_external_data=False).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    matches = collections.Counter()
    for record in report.passes:
        matches.update(record.rule_matches)
    # lower-gqa also says how many rotary rows its caches hold: that is not a refusal
    notes = [n if n.startswith(f"{r.name}:") else f"{r.name}: {n}" for r in report.passes if r.name in FUSION_PASSES
             for n in r.notes if not n.startswith(f"{r.name}: rotary caches for")]
    replay = check_sequence_equivalence(out, exported.model_path, examples=6, require_greedy=True)
    return {"arch": arch, "exporter": exporter,
            # rotations the rotary pass fused, whether they stay RotaryEmbedding or go into GroupQueryAttention
            "rotary": f"{matches['rotary-half'] + matches['rotary-interleaved']} "
                      f"({matches['rotary-partial'] + matches['rotary-partial-heads-second']} partial, "
                      f"{matches['rotary-interleaved']} interleaved; {ops['RotaryEmbedding']} left)",
            "split": f"{matches['pack-three-matmuls']} x3, {matches['pack-two-matmuls']} x2",
            "skip": ops["SkipSimplifiedLayerNormalization"], "attention": ops["Attention"],
            "gqa": ops["GroupQueryAttention"],
            "seconds": seconds, "replay": "equivalent" if replay.equivalent else f"FAILED: {replay}".splitlines()[0],
            "notes": notes}


def main(argv: list[str] | None = None) -> int:
    from qgraph.export.zoo import TINY_ARCHS

    parser = benchmark_parser(__doc__, SECTION)
    decoders = [name for name, arch in TINY_ARCHS.items() if arch.task == "causal-lm"]
    parser.add_argument("--archs", nargs="+", default=decoders)
    parser.add_argument("--exporters", nargs="+", default=["dynamo", "torchscript"])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgraph-ort-zoo-") as scratch:
        for arch in args.archs:
            for exporter in args.exporters:
                try:
                    rows.append(run_one(arch, exporter, Path(scratch)))
                except Exception as exc:  # an export or preset failure is a row of the table, not a crash
                    rows.append({"arch": arch, "exporter": exporter, "rotary": "-", "split": "-", "skip": "-",
                                 "gqa": "-", "attention": "-", "seconds": 0.0,
                                 "replay": f"ERROR: {type(exc).__name__}: {exc}"[:200], "notes": []})
                print(rows[-1]["arch"], rows[-1]["exporter"], rows[-1]["replay"], flush=True)
    lines = [
        "Command: `.venv/bin/python benchmarks/ort_fusions_zoo.py --write`", "",
        f"Machine: {machine_description()}. *preset s*: one run each, a rough figure (the preset's timing is "
        "\"ort preset time\").", "",
        "Tiny zoo (2 layers each). *rotations fused*: q and k rotations the `rotary` pass made RotaryEmbedding "
        "(how many turn part of the head, how many turn interleaved pairs; how many are left as RotaryEmbedding "
        "after `lower-gqa` took the rest into GroupQueryAttention); *packed* = groups of 3 and of 2 "
        "sibling MatMuls packed into one; the other columns count ops in the `ort` preset's output; "
        "replay = cached graph vs the no-cache export on drawn sequences.", "",
        "| arch | exporter | rotations fused | packed | SkipSimplifiedLayerNorm | GroupQueryAttention "
        "| Attention | preset s | replay |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['exporter']} | {r['rotary']} | {r['split']} | {r['skip']} | {r['gqa']} | "
                     f"{r['attention']} | {r['seconds']:.2f} | {r['replay']} |")
    notes = [f"- {r['arch']} {r['exporter']}: {n}" for r in rows for n in r["notes"]]
    lines += ["", "What the fusion and lowering passes refused or kept apart (from their report notes):", ""]
    lines += notes or ["- none"]
    if args.note:
        lines += ["", args.note]
    publish(SECTION, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

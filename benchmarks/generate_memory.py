"""Peak memory of ``qgraph generate``: the folder's tokenizer read from tokenizer.json vs through AutoTokenizer.

    .venv/bin/python benchmarks/generate_memory.py [--presets ort,ort-int4] [--rounds 3]
                                                   [--max-new-tokens 64] [--out DIR] [--write] [--note TEXT]

transformers' AutoTokenizer imports torch; ``qgraph generate`` used it to
read the tokenizer and so carried torch's ~300 MiB into every generation.
It now reads tokenizer.json with the ``tokenizers`` library
(qgraph/runtime/light_tokenizer.py). This measures both on SmolLM2-135M's
ort graphs (the packaged GGUF, exported with dynamo and run through the
presets as ``qgraph demo`` does): each measurement is a fresh process
running the ``qgraph`` executable's code (``qgraph.cli.entry``: started
again with huge pages where glibc and the kernel allow, sympy deferred) on ``generate DIR --prompt P --max-new-tokens N``; the
AutoTokenizer peer is the same process with ``ModelFolder.tokenizer``
replaced by transformers' AutoTokenizer, as it was before. Peak RSS is the
process's VmHWM; rounds are interleaved, medians reported; the generated
tokens of both must be the same.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import benchmark_parser, in_child, peak_rss_mib, ran_as_child
from results_file import machine_description, publish

SECTION = "qgraph generate peak memory"
MODEL = "smollm2-135m"
PROMPT = "In a quiet village at the edge of the forest, there lived a"
LIGHT, AUTO = "tokenizer.json (tokenizers)", "AutoTokenizer (transformers)"


def _child(task: dict[str, Any]) -> dict[str, Any]:
    from qgraph.deferred_imports import DEFERRED, defer
    from qgraph.huge_pages import restart_with_huge_pages

    # What the qgraph executable does before main(): start again with glibc's huge pages where they apply
    # (this child process, same arguments), and defer sympy.
    restart_with_huge_pages(["generate"])
    for name in DEFERRED:
        defer(name)
    import qgraph.runtime.session as session
    from qgraph.cli import main

    if task["tokenizer"] == AUTO:
        def auto_tokenizer(self: session.ModelFolder) -> Any:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(os.fspath(self.tokenizer_folder))

        session.ModelFolder.tokenizer = auto_tokenizer
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "r.json"
        code = main(["generate", task["folder"], "--prompt", task["prompt"], "--max-new-tokens", str(task["tokens"]),
                     "--no-stream", "--json", str(report)], out=io.StringIO())
        if code != 0:
            raise SystemExit(f"qgraph generate exited {code}")
        (row,) = json.loads(report.read_text())["rows"]
    return {"peak_rss_mib": peak_rss_mib(), "tokens": row["token_ids"],
            "heavy_imports": sorted(m for m in ("torch", "transformers") if m in sys.modules),
            "huge_pages": "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", "")}


def _graphs(out: Path, presets: list[str]) -> dict[str, Path]:
    from qgraph.demo import run_preset
    from qgraph.export import Progress, export_model
    from qgraph.registry import default_registry

    registry = default_registry()
    print(f"exporting {MODEL} (dynamo; cached after the first time) ...", file=sys.stderr)
    exported = export_model(MODEL, out / "export", exporter="dynamo", progress=Progress())
    graphs = {}
    for preset in presets:
        folder = out / "qgraph" / preset
        if not (folder / "model.onnx").exists():
            print(f"preset {preset} ...", file=sys.stderr)
            run_preset(preset, exported.output_dir, out / "qgraph", registry)
        graphs[preset] = folder
    return graphs


def format_report(results: dict[tuple[str, str], list[dict[str, Any]]], args: Any) -> str:
    lines = [
        f"Command: `.venv/bin/python benchmarks/generate_memory.py --presets {args.presets} --rounds {args.rounds} "
        f"--max-new-tokens {args.max_new_tokens} --write`",
        "",
        f"Machine: {machine_description()} (how busy it was: see the note at the end).",
        "",
        f"`qgraph generate` on SmolLM2-135M's graphs, prompt {PROMPT!r}, {args.max_new_tokens} tokens; a fresh "
        f"process each, {args.rounds} interleaved rounds, median peak RSS (VmHWM); glibc huge pages "
        f"{'on' if all(r['huge_pages'] for runs in results.values() for r in runs) else 'off'} (qgraph/huge_pages.py).",
        "",
        f"| preset | tokenizer read by | peak RSS MiB | torch/transformers imported | vs {AUTO.split()[0]} | same tokens |",
        "|---|---|---:|---|---:|---|",
    ]
    for preset in args.presets.split(","):
        auto = statistics.median(r["peak_rss_mib"] for r in results[(preset, AUTO)])
        for tokenizer in (LIGHT, AUTO):
            runs = results[(preset, tokenizer)]
            rss = statistics.median(r["peak_rss_mib"] for r in runs)
            heavy = ", ".join(sorted({m for r in runs for m in r["heavy_imports"]})) or "no"
            same = all(r["tokens"] == results[(preset, AUTO)][0]["tokens"] for r in runs)
            lines.append(f"| {preset} | {tokenizer} | {rss:.0f} | {heavy} | {rss / auto:.2f}x | "
                         f"{'yes' if same else 'NO'} |")
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--presets", default="ort,ort-int4")
    parser.add_argument("--rounds", type=int, default=3, metavar="N")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--out", metavar="DIR", help="keep the graphs here (and reuse them on a rerun)")
    args = parser.parse_args(argv)
    if ran_as_child(args, _child):
        return 0
    with tempfile.TemporaryDirectory(prefix="qgraph-generate-memory-") as scratch:
        graphs = _graphs(Path(args.out) if args.out else Path(scratch), args.presets.split(","))
        results: dict[tuple[str, str], list[dict[str, Any]]] = {(p, t): [] for p in graphs for t in (LIGHT, AUTO)}
        for round_ in range(args.rounds):
            for preset, folder in graphs.items():
                for tokenizer in (LIGHT, AUTO):
                    print(f"round {round_ + 1}/{args.rounds}: {preset}, {tokenizer} ...", file=sys.stderr)
                    task = {"folder": str(folder), "tokenizer": tokenizer, "prompt": PROMPT,
                            "tokens": args.max_new_tokens}
                    results[(preset, tokenizer)].append(in_child(__file__, task))
    publish(SECTION, format_report(results, args), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

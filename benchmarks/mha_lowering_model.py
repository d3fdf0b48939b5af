"""A whole GPT-2-small-shaped model in onnxruntime: its attention as Attention, MultiHeadAttention, GroupQueryAttention.

    .venv/bin/python benchmarks/mha_lowering_model.py [--contexts 16,256,900] [--steps 16] [--rounds 2]
                                                     [--exporter dynamo|torchscript] [--out DIR] [--write]
                                                     [--note TEXT]

What ``benchmarks/mha_lowering.py`` measures on attention layers alone,
measured where it counts: a random-weight GPT-2 with GPT-2 small's shape
(12 layers, 12 heads of 64, vocabulary 50257), exported by dynamo or
TorchScript, through the ``ort-attention`` preset (every layer an ONNX
``Attention`` on the concat cache), the same graph with ``lower-mha`` after
it (every layer a ``MultiHeadAttention``, concat cache), and the ``ort``
preset (every layer a ``GroupQueryAttention``, one shared cache buffer).
Each runs as ``qgraph generate`` runs it
(:func:`qgraph.runtime.engines.make_engine`, 2 threads, one process). For
each context c: a prefill of c random tokens (timed, each graph in turn)
and ``--steps`` greedy decode steps alternating between the graphs (every
other round in the reverse order), after one warm-up generation each.
Greedy tokens must agree (the benchmark fails otherwise). GPT-2 has 1024
positions, so contexts stay below that.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import benchmark_parser, interleaved_decode
from results_file import machine_description, publish

SECTION = "MultiHeadAttention lowering: GPT-2 small, whole model"
THREADS = 2
VOCAB = 50257


def _hf_folder(folder: Path) -> Path:
    """GPT-2 small's config with random weights (seed 0) and the zoo's byte tokenizer, written once."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from qgraph.export.zoo import _byte_tokenizer

    config = GPT2Config(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return folder


def _graphs(out: Path, exporter: str) -> dict[str, Path]:
    from qgraph import io
    from qgraph.demo import run_preset
    from qgraph.export import Progress, export_model
    from qgraph.manager import PassManager
    from qgraph.registry import default_registry

    out = out / exporter
    lowered = out / "lower-mha" / "model.onnx"
    plain = out / "ort-attention" / "model.onnx"
    gqa = out / "ort" / "model.onnx"
    if not lowered.exists():
        exported = export_model(_hf_folder(out.parent / "gpt2-small-hf"), out / "export", exporter=exporter,
                                progress=Progress())
        for preset in ("ort-attention", "ort"):
            print(f"preset {preset} ...", file=sys.stderr)
            run_preset(preset, exported.output_dir, out, default_registry())
        model = io.load(plain)
        report = PassManager(["lower-mha"]).run(model)
        record = next(r for r in report.passes if r.name == "lower-mha")
        print(f"lower-mha: {record.rule_matches}", file=sys.stderr)
        lowered.parent.mkdir(parents=True, exist_ok=True)
        io.save(model, lowered, external_data=True)
    return {"Attention": plain, "MultiHeadAttention": lowered, "GroupQueryAttention": gqa}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--contexts", default="16,256,900")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--out", metavar="DIR", help="keep (and reuse) the model, export and graphs here")
    args = parser.parse_args(argv)
    from qgraph.runtime.engines import make_engine

    with tempfile.TemporaryDirectory(prefix="qgraph-mha-") as scratch:
        graphs = _graphs(Path(args.out) if args.out else Path(scratch), args.exporter)
        engines = {name: make_engine(path, threads=THREADS) for name, path in graphs.items()}
        names = list(engines)
        rng = np.random.default_rng(0)
        interleaved_decode(engines, rng.integers(3, 256, size=(1, 8)), 2, flip=False)  # warm-up: a session's first runs allocate
        rows = []
        for context in (int(c) for c in args.contexts.split(",")):
            prompt = rng.integers(3, 256, size=(1, context))
            prefills: dict[str, list[float]] = {n: [] for n in names}
            times: dict[str, list[float]] = {n: [] for n in names}
            for round_ in range(args.rounds):
                print(f"context {context}, round {round_ + 1} ...", file=sys.stderr)
                prefill, got, tokens = interleaved_decode(engines, prompt, args.steps, flip=bool(round_ % 2))
                if any(tokens[n] != tokens[names[0]] for n in names):
                    raise SystemExit(f"greedy tokens differ at context {context}: {tokens}")
                for name in names:
                    prefills[name].append(prefill[name])
                    times[name] += got[name]
            rows.append((context, {n: 1000 * min(prefills[n]) for n in names},
                         {n: 1000 * statistics.median(times[n]) for n in names},
                         {n: 1000 * min(times[n]) for n in names}))
    base, *others = names
    kinds = {n: f"{n} ({engines[n].kind})" for n in names}
    lines = [
        f"Command: `.venv/bin/python benchmarks/mha_lowering_model.py --contexts {args.contexts} --steps {args.steps} "
        f"--rounds {args.rounds} --exporter {args.exporter} --write`",
        "",
        f"Machine: {machine_description()}.",
        "",
        (f"Random-weight GPT-2 with GPT-2 small's shape (12 layers, 12 heads of 64, vocabulary 50257), {args.exporter} "
         f"export; every layer as {', '.join(kinds.values())}; {THREADS} threads, one process. Prefill of c random "
         f"tokens: fastest of {args.rounds}; decode: median / fastest of {args.rounds} x {args.steps} steps "
         f"alternating between the graphs; greedy tokens agree (checked). Ratios: against {base}."),
        "",
        "| context c | step | " + " | ".join(f"{n} ms" for n in names) + " | "
        + " | ".join(f"{n} / {base}" for n in others) + " |",
        "|---:|---|" + "---:|" * (len(names) + len(others)),
    ]
    for context, prefill, median, fastest in rows:
        lines.append(f"| {context} | prefill | " + " | ".join(f"{prefill[n]:.1f}" for n in names) + " | "
                     + " | ".join(f"{prefill[n] / prefill[base]:.2f}x" for n in others) + " |")
        lines.append(f"| {context} | decode (median / fastest) | "
                     + " | ".join(f"{median[n]:.2f} / {fastest[n]:.2f}" for n in names) + " | "
                     + " | ".join(f"{median[n] / median[base]:.2f}x" for n in others) + " |")
    if args.note:
        lines += ["", args.note]
    publish(SECTION, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

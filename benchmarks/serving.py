"""Serving features of the device graph on SmolLM2-135M in onnxruntime: continuous batching and CCL.

    .venv/bin/python benchmarks/serving.py [--onnx EXPORT/model.onnx] [--slots 4] [--prompts 16]
        [--new-tokens 32] [--ctx-len 512] [--threads 2] [--write] [--note TEXT]

One graph, made in this run by the ``qaic`` preset with
``kv-cache.full_batch_size`` and ``kv-cache.comp_ctx_lengths`` (the serving
options compose), is measured two ways:

1. **continuous batching**: the same ``--prompts`` prompts (different
   lengths) served through ``--slots`` cache rows -- a free row takes the
   next request at once -- against one request at a time through one row
   (``serve(..., slots=1)`` on the same graph). Total generated tokens/s
   of each, and the greedy tokens must be identical (the run fails if not).
   Rounds alternate (one-at-a-time, batched, one-at-a-time, ...) and the
   best of each is reported, so a busy machine slows both alike.
2. **compute-context lengths**: the time of one decode step of one sequence
   at position 40, with ``comp_ctx_lengths`` of each compiled length fed
   (attention reads that many slots), median of ``--steps`` steps each,
   interleaved; the logits of every length must equal the full context's.

``--write`` replaces the "Serving" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import RESULTS, machine_description, publish

SECTION = "Serving"
MODEL = "smollm2-135m"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first humans landed on",
    "A recipe for pancakes: first, take",
    "Photosynthesis is the process by which plants",
    "The quick brown fox",
    "Water boils at a temperature of",
    "My favourite book is about a young wizard who",
    "The largest planet in our solar system is",
    "To be or not to be,",
    "Machine learning is a field of computer science that",
    "The train left the station at noon and",
    "Dear diary, today I",
    "The sum of the angles of a triangle is",
]


def build(source: Path, out: Path, slots: int, ctx_len: int, lengths: list[int]) -> float:
    from qgraph import io
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline
    from qgraph.registry import default_registry

    registry = default_registry()
    pipeline = Pipeline.from_preset("qaic", registry)
    pipeline.set_options({"kv-cache": {"ctx_len": ctx_len, "full_batch_size": slots, "prefill_len": 32,
                                       "comp_ctx_lengths": ",".join(map(str, lengths))}})
    model = io.load(source)
    started = time.perf_counter()
    PassManager(pipeline, registry=registry).run(model)
    seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True)
    io.save(model, out, external_data=True, protect=[source])
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
                 "special_tokens_map.json"):
        if (source.parent / name).exists():
            (out.parent / name).write_bytes((source.parent / name).read_bytes())
    return seconds


def continuous_batching(model: Path, slots: int, prompts: int, new_tokens: int, threads: int, rounds: int) -> dict:
    from qgraph.runtime.batching import serve
    from qgraph.runtime.generate import load_generator

    generator = load_generator(model, threads=threads)
    ids = [generator.encode(PROMPTS[i % len(PROMPTS)]) for i in range(prompts)]
    runs: dict[int, list] = {1: [], slots: []}
    for _ in range(rounds):
        for n in (1, slots):
            runs[n].append(serve(generator, ids, slots=n, max_new_tokens=new_tokens))
    tokens = {n: [r.token_ids for r in results] for n, results in runs.items()}
    reference = tokens[1][0]
    if any(t != reference for ts in tokens.values() for t in ts):
        raise SystemExit("continuous batching changed the tokens: the benchmark does not count")
    best = {n: max(results, key=lambda r: r.stats.tokens_per_second).stats for n, results in runs.items()}
    return {"best": best, "prompt_lengths": [len(i) for i in ids], "engine": generator.engine.describe()}


def compute_context(model: Path, lengths: list[int], steps: int, threads: int, position: int = 40) -> dict:
    from qgraph.runtime.engines import make_engine
    from qgraph.runtime.session import ModelFolder

    folder = ModelFolder.find(model)
    engine = make_engine(folder.model_path, threads=threads, specializations=folder.specializations())
    engine.start(1)
    engine.prefill(np.arange(3, 3 + position)[None], np.ones((1, position), bool))
    times: dict[int, list[float]] = {n: [] for n in lengths}
    logits: dict[int, np.ndarray] = {}
    original = engine._serving_feeds
    for _ in range(steps):
        for n in lengths:
            engine._serving_feeds = lambda batch, positions, n=n: {**original(batch, positions),
                                                                    "comp_ctx_lengths": np.zeros(n, np.int64)}
            engine._seen[:] = position  # every step decodes the same position: the cache is not advanced
            started = time.perf_counter()
            out = engine.decode(np.array([7]), np.array([True]))
            times[n].append(time.perf_counter() - started)
            logits[n] = out
    full = logits[max(lengths)]
    worst = max(float(np.abs(logits[n] - full).max()) for n in lengths)
    return {"ms": {n: 1000 * statistics.median(t) for n, t in times.items()}, "max_logit_difference": worst,
            "position": position}


def report(args, seconds: float, cb: dict, ccl: dict) -> str:
    one, many = cb["best"][1], cb["best"][args.slots]
    lines = [
        f"Command: `.venv/bin/python benchmarks/serving.py --slots {args.slots} --prompts {args.prompts} "
        f"--new-tokens {args.new_tokens} --ctx-len {args.ctx_len} --threads {args.threads}`",
        "",
        f"Machine: {machine_description()}.",
        "",
        f"Graph: the `qaic` preset on the dynamo export of {MODEL} with kv-cache.full_batch_size={args.slots}, "
        f"ctx_len={args.ctx_len}, comp_ctx_lengths={','.join(map(str, args.ccl))} (preset {seconds:.1f} s); "
        f"run in onnxruntime ({cb['engine']}), {args.threads} threads.",
        "",
        f"### Continuous batching: {args.prompts} prompts ({min(cb['prompt_lengths'])}-{max(cb['prompt_lengths'])} "
        f"tokens), up to {args.new_tokens} new tokens each, greedy; best of {args.rounds} alternating rounds",
        "",
        "| serving | tokens | seconds | total tokens/s | decode steps | slots busy |",
        "|---|---:|---:|---:|---:|---:|",
        f"| one request at a time (1 row) | {one.generated_tokens} | {one.seconds:.2f} | "
        f"{one.tokens_per_second:.1f} | {one.decode_steps} | {100 * one.occupancy:.0f}% |",
        f"| continuous batching ({args.slots} rows) | {many.generated_tokens} | {many.seconds:.2f} | "
        f"{many.tokens_per_second:.1f} | {many.decode_steps} | {100 * many.occupancy:.0f}% |",
        "",
        f"Speed-up {many.tokens_per_second / one.tokens_per_second:.2f}x total tokens/s; the tokens of every "
        "request are identical in both (checked).",
        "",
        f"### Compute-context length: one decode step at position {ccl['position']} (median of {args.steps})",
        "",
        "| comp_ctx_lengths | decode step ms | vs full context |",
        "|---:|---:|---:|",
    ]
    full = ccl["ms"][max(ccl["ms"])]
    lines += [f"| {n} | {ms:.2f} | {ms / full:.2f}x |" for n, ms in sorted(ccl["ms"].items())]
    lines += ["", f"Largest logit difference from the full context: {ccl['max_logit_difference']:.2g}."]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, help="an existing no-cache dynamo export of SmolLM2 (model.onnx)")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ctx-len", type=int, default=2048)
    parser.add_argument("--ccl", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512, 2048])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of {RESULTS.name}")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qgraph-serving-") as scratch:
        scratch = Path(scratch)
        source = args.onnx
        if source is None:
            from qgraph.export.frontend import export_model

            print(f"exporting {MODEL} (cached after the first time) ...", file=sys.stderr)
            source = Path(export_model(MODEL, scratch / "export").model_path)
        model = scratch / "served" / "model.onnx"
        print("running the qaic preset with the serving options ...", file=sys.stderr)
        seconds = build(source, model, args.slots, args.ctx_len, args.ccl)
        print("continuous batching ...", file=sys.stderr)
        cb = continuous_batching(model, args.slots, args.prompts, args.new_tokens, args.threads, args.rounds)
        print("compute-context lengths ...", file=sys.stderr)
        ccl = compute_context(model, args.ccl, args.steps, args.threads)
    publish(SECTION, report(args, seconds, cb, ccl), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

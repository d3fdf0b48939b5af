"""Greedy speculative decoding vs plain greedy decoding of SmolLM2-135M in onnxruntime.

    .venv/bin/python benchmarks/speculative_decoding.py --target DIR --draft DIR [--draft DIR ...]
        [--k 2 4] [--rounds 3] [--new-tokens 48] [--threads 2] [--tokenizer DIR] [--write] [--note TEXT]

``--target``: a retained-state graph made with ``kv-cache``'s
``num_speculative_tokens`` (folder or .onnx); ``--draft``: retained-state
draft graphs, e.g. the target's first N layers::

    qgraph optimize EXPORT/model.onnx -o target/model.onnx --passes rmsnorm attention kv-cache \\
        --option kv-cache.ctx_len=256 --option kv-cache.num_speculative_tokens=4
    qgraph optimize EXPORT/model.onnx -o draft8/model.onnx --passes rmsnorm attention truncate-layers kv-cache \\
        --option truncate-layers.layers=8 --option kv-cache.ctx_len=256

Each prompt runs alone (batch 1), ``--new-tokens`` greedy tokens, with every
configuration: plain decoding with the target, and speculative decoding with
each draft and each K. Rounds are interleaved -- every round runs every
prompt under every configuration, in an order rotated each round -- so a
load change on the (shared) machine hits all configurations alike; the
speed-up is the median over rounds of plain decode time / speculative decode
time, both summed over the prompts. The tokens of every speculative run must
equal plain decoding's; the benchmark fails if not.

``--write`` replaces the "Speculative decoding" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from results_file import machine_description, publish

SECTION = "Speculative decoding"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Machine learning is a field of computer science that",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", action="append", required=True)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: beside the target)")
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of RESULTS.md")
    parser.add_argument("--note", default="", help="a remark appended to the section")
    args = parser.parse_args(argv)

    from qgraph.runtime.engines import make_engine
    from qgraph.runtime.generate import Generator
    from qgraph.runtime.session import ModelFolder
    from qgraph.runtime.speculative import SpeculativeGenerator

    folder = ModelFolder.find(args.target, tokenizer=args.tokenizer)
    tokenizer = folder.tokenizer()
    target = make_engine(folder.model_path, threads=args.threads, specializations=folder.specializations(),
                         config=folder.config())
    drafts = {}
    for spec in args.draft:
        d = ModelFolder.find(spec)
        drafts[spec] = make_engine(d.model_path, threads=args.threads, specializations=d.specializations(),
                                   config=d.config() or folder.config(), label=f"draft {spec}")
    eos = sorted(folder.eos_token_ids(tokenizer))
    configs: list[tuple[str, object]] = [("plain", Generator(target, tokenizer, eos))]
    for spec, engine in drafts.items():
        for k in args.k:
            configs.append((f"{spec} K={k}", SpeculativeGenerator(target, engine, k, tokenizer, eos)))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]

    decode = {name: [] for name, _ in configs}  # per round: decode seconds summed over prompts
    total = {name: [] for name, _ in configs}
    tokens: dict[str, list] = {}
    generated = 0
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        sums = {name: [0.0, 0.0] for name, _ in configs}
        for prompt in prompts:
            for name, gen in order:
                result = gen.generate_ids([prompt], max_new_tokens=args.new_tokens)
                sums[name][0] += result.stats.decode_seconds
                sums[name][1] += result.stats.end_to_end
                key = f"{name}|{prompt}"
                if key in tokens and tokens[key] != result.token_ids:
                    raise SystemExit(f"{name}: tokens changed between rounds")
                tokens[key] = result.token_ids
                if name == "plain" and r == 0:
                    generated += len(result.token_ids[0])
        for name, (d, t) in sums.items():
            decode[name].append(d)
            total[name].append(t)
        print(f"round {r + 1}: " + ", ".join(f"{n} {s[0]:.2f}s" for n, s in sums.items()), file=sys.stderr)
    for name, _ in configs[1:]:
        for prompt in prompts:
            if tokens[f"{name}|{prompt}"] != tokens[f"plain|{prompt}"]:
                raise SystemExit(f"{name}: tokens differ from plain greedy decoding on prompt {prompt}")

    lines = [
        f"Machine: {machine_description()}. **Shared** with other engineers' jobs while measured "
        f"(2 cores, several test runs at once): absolute times are noisy; the ratios come from interleaved rounds.",
        "",
        f"Command: `.venv/bin/python benchmarks/speculative_decoding.py --target {args.target} "
        + " ".join(f"--draft {d}" for d in args.draft)
        + f" --k {' '.join(map(str, args.k))} --rounds {args.rounds} --new-tokens {args.new_tokens} "
        f"--threads {args.threads}" + (f" --tokenizer {args.tokenizer}" if args.tokenizer else "") + "`",
        "",
        f"{len(prompts)} prompts, each alone (batch 1), {args.new_tokens} new tokens max ({generated} generated "
        f"in all per configuration), greedy; {args.rounds} interleaved rounds. Target: {target.describe()}. "
        "Every speculative run gave exactly the plain run's tokens.",
        "",
        "| configuration | acceptance | tokens / target run | target runs | decode s (median round) "
        "| decode speed-up (median of per-round ratios) | end-to-end speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base_d, base_t = decode["plain"], total["plain"]
    for name, gen in configs:
        med = statistics.median(decode[name])
        if name == "plain":
            lines.append(f"| plain greedy (target alone) | - | 1.00 | - | {med:.2f} | 1.00 | 1.00 |")
            continue
        s = gen.speculation
        up = statistics.median(b / x for b, x in zip(base_d, decode[name]))
        up_t = statistics.median(b / x for b, x in zip(base_t, total[name]))
        lines.append(f"| {name} | {s.acceptance_rate:.1%} | {s.tokens_per_round:.2f} | {s.rounds // args.rounds} "
                     f"| {med:.2f} | {up:.2f} | {up_t:.2f} |")
    if args.note:
        lines += ["", args.note]
    publish(SECTION, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""quantize: how int4 blocks are rounded (symmetric or with zero points, round to nearest or GPTQ) and how
large they are, against quality and decode speed on SmolLM2-135M.

    .venv/bin/python benchmarks/quantize_methods.py [--exports DIR] [--block-sizes 64,128]
                                                    [--calibration-tokens N[,N...]|none] [--rounds 2]
                                                    [--write] [--note TEXT]

Every graph is the ``ort-int4`` preset (blocks of 32, symmetric,
accuracy_level 4) on the same dynamo export (``--exports DIR`` reads
DIR/smollm2-dynamo/model.onnx; otherwise qgraph's export cache), with one
``quantize`` option changed: ``symmetric=false`` (zero points), a larger
``block_size`` (``--block-sizes``), or ``method=gptq`` (one graph per
``--calibration-tokens``; ``none``: no GPTQ graph); the ``ort`` preset gives
the fp32 graph they are compared with. Quality:

* *budget text*: what ``--verify`` checks (``qgraph.verify.budget``): greedy
  next-token agreement with fp32 and perplexity rise on the fp32 graph's own
  48-token greedy text (seed 0; GPTQ calibrates on other seeds' text), and the
  same on a 128-token text;
* *texts*: perplexity rise over the fixed paragraphs of
  ``benchmarks/perplexity.py`` (teacher-forced, every position);
* *greedy*: of 64 greedy tokens after the demo prompt (qgraph's generator,
  KV cache), how many equal fp32's, and where the first difference is.

Speed: the ``quantize`` pass's own seconds (GPTQ: calibration included, in
the pass note), and decode tokens/s / TTFT of ``qgraph.runtime`` (2 threads;
each a fresh child process, interleaved rounds, medians), as a ratio of the
preset's graph measured in the same run.
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import benchmark_parser, exported, in_child, ran_as_child  # noqa: E402
from perplexity import TEXTS, next_token_losses  # noqa: E402
from results_file import machine_description, publish  # noqa: E402

SECTION = "quantize methods: rounding, block size and GPTQ (int4, SmolLM2-135M)"
PROMPT = "In a quiet village at the edge of the forest, there lived a"  # qgraph demo's prompt
TOKENS = 64
THREADS = 2
_MODEL_FILES = ("model.onnx", "model.onnx.data")


def _child(task: dict[str, Any]) -> dict[str, Any]:
    from qgraph.runtime.generate import load_generator

    generator = load_generator(task["folder"], threads=THREADS)
    generator.eos_token_ids = frozenset()
    generator.generate([PROMPT], max_new_tokens=4)
    runs, tokens = [], []
    for _ in range(task["repeats"]):
        result = generator.generate([PROMPT], max_new_tokens=TOKENS)
        runs.append((result.stats.ttft, result.stats.decode_tokens_per_second))
        tokens = [int(t) for t in result.token_ids[0]]
    return {"ttft": [r[0] for r in runs], "decode": [r[1] for r in runs], "tokens": tokens}


def _build(export: Path, preset: str, options: dict[str, Any], out: Path) -> tuple[Any, float, list[str]]:
    from qgraph import io
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline
    from qgraph.registry import default_registry

    registry = default_registry()
    model = io.load(export)
    pipeline = Pipeline.from_preset(preset, registry)
    if options:
        pipeline.set_options({"quantize": options})
    report = PassManager(pipeline, registry=registry).run(model)
    record = next((r for r in report.passes if r.name == "quantize"), None)
    out.mkdir(parents=True)
    io.save(model, out / "model.onnx", external_data=True, protect=[export])
    for item in export.parent.iterdir():  # tokenizer, config, generation config
        if item.is_file() and item.name not in _MODEL_FILES and not item.name.startswith("model.onnx"):
            shutil.copy2(item, out / item.name)
    return io.load(out / "model.onnx"), (record.seconds if record else 0.0), (record.notes if record else [])


def _perplexity(decoder: Any, texts: list[np.ndarray]) -> float:
    """Over every text, every position's next token (each text on its own, from an empty past)."""
    return float(np.exp(np.mean(np.concatenate([next_token_losses(decoder.all_positions(ids), ids) for ids in texts]))))


def main() -> None:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--exports", type=Path, help="folder holding smollm2-dynamo/model.onnx")
    parser.add_argument("--calibration-tokens", default="",
                        help="comma-separated quantize.calibration_tokens, one GPTQ graph each (default: the pass's; "
                        "none: no GPTQ graph)")
    parser.add_argument("--block-sizes", default="64,128",
                        help="comma-separated larger quantize.block_size values, one symmetric RTN graph each")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if ran_as_child(args, _child):
        return

    import transformers

    from qgraph.verify.budget import Budget, Decoder, check_budget

    export = exported("smollm2-135m", "dynamo", args.exports, "smollm2-dynamo")
    tokenizer = transformers.AutoTokenizer.from_pretrained(export.parent)
    texts = [np.array(tokenizer(text)["input_ids"], np.int64) for text in TEXTS]
    variants = [("fp32 (ort)", "ort", {}), ("int4 RTN symmetric (ort-int4)", "ort-int4", {}),
                ("int4 RTN zero points (symmetric=false)", "ort-int4", {"symmetric": False})]
    for size in [int(b) for b in args.block_sizes.split(",") if b]:
        variants.append((f"int4 RTN symmetric, block_size={size}", "ort-int4", {"block_size": size}))
    gptq = [] if args.calibration_tokens == "none" else [int(t) for t in args.calibration_tokens.split(",") if t]
    for tokens in gptq or ([] if args.calibration_tokens == "none" else [None]):
        options = {"method": "gptq", **({"calibration_tokens": tokens} if tokens else {})}
        label = "int4 GPTQ (ort-int4, method=gptq" + (f", calibration_tokens={tokens})" if tokens else ")")
        variants.append((label, "ort-int4", options))
    work = Path(tempfile.mkdtemp(prefix="qgraph-quantize-methods-"))
    try:
        built = {}
        for label, preset, options in variants:
            print(f"building {label} ...", file=sys.stderr)
            started = time.perf_counter()
            model, seconds, notes = _build(export, preset, options, work / f"v{len(built)}")
            built[label] = {"model": model, "folder": work / f"v{len(built)}", "quantize_s": seconds, "notes": notes,
                            "pipeline_s": time.perf_counter() - started}
        fp32 = built["fp32 (ort)"]["model"]
        reference = Decoder(fp32, "fp32")
        fp32_texts = _perplexity(reference, texts)
        reference.close()
        for label, entry in list(built.items())[1:]:
            print(f"quality of {label} ...", file=sys.stderr)
            for tokens in (48, 128):
                verdict = check_budget(fp32, entry["model"], Budget(0.0, 100.0, 0.05, tokens))
                entry[f"budget{tokens}"] = (verdict.agreement, verdict.perplexity_rise)
            candidate = Decoder(entry["model"], label)
            entry["texts"] = _perplexity(candidate, texts) / fp32_texts - 1
            candidate.close()
        results: dict[str, list[dict[str, Any]]] = {label: [] for label in built}
        for round_ in range(args.rounds):
            for label, entry in built.items():
                print(f"round {round_ + 1}/{args.rounds}: {label} ...", file=sys.stderr)
                results[label].append(in_child(__file__, {"folder": str(entry["folder"]), "repeats": args.repeats}))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    fp32_tokens = results["fp32 (ort)"][-1]["tokens"]
    speed = {label: (statistics.median(d for r in runs for d in r["decode"]),
                     1000 * statistics.median(t for r in runs for t in r["ttft"])) for label, runs in results.items()}
    rtn_label = variants[1][0]
    for label, entry in built.items():
        decode, ttft = speed[label]
        tokens = results[label][-1]["tokens"]
        if label == "fp32 (ort)":
            rows.append(f"| {label} | - | - | - | - | {TOKENS}/{TOKENS} | {entry['pipeline_s']:.1f} | - | "
                        f"{decode:.1f} | {ttft:.1f} | - |")
            continue
        same = sum(1 for a, b in zip(tokens, fp32_tokens) if a == b)
        first = next((i for i, (a, b) in enumerate(zip(tokens, fp32_tokens)) if a != b), None)
        (a48, r48), (a128, r128) = entry["budget48"], entry["budget128"]
        rows.append(f"| {label} | {a48:.1%}, {r48:+.1%} | {a128:.1%}, {r128:+.1%} | {entry['texts']:+.1%} | "
                    f"{'none' if first is None else first} | {same}/{TOKENS} | {entry['pipeline_s']:.1f} | "
                    f"{entry['quantize_s']:.1f} | {decode:.1f} | {ttft:.1f} | "
                    f"{decode / speed[rtn_label][0]:.2f}x |")
    calibrations = [next((n for n in built[v[0]]["notes"] if n.startswith("gptq: calibrated")), "")
                    for v in variants if v[2].get("method") == "gptq"]
    seconds = [m.group(1) for m in (re.search(r"in ([\d.]+) s$", c) for c in calibrations) if m]
    command = "`.venv/bin/python benchmarks/quantize_methods.py" + "".join(
        f" {flag} {value}" for flag, value in (("--exports", args.exports), ("--block-sizes", args.block_sizes),
                                               ("--calibration-tokens", args.calibration_tokens))
        if value) + f" --rounds {args.rounds} --write`"
    report = "\n".join([
        f"Command: {command}",
        "",
        f"Machine: {machine_description(('onnx', 'onnxruntime', 'onnx-ir', 'numpy'))}.",
        "",
        (f"SmolLM2-135M (packaged Q4_1 GGUF dequantized to float32 by `qgraph export`, dynamo), presets `ort` "
         f"(fp32) and `ort-int4` (blocks of 32, symmetric, accuracy_level 4), each row with the one `quantize` "
         f"option it names. *budget text 48 / 128*: greedy next-token agreement with fp32 and perplexity rise on "
         f"the fp32 graph's own greedy text from `qgraph.verify.budget`'s seed-0 prompt (what `--verify` checks; "
         f"GPTQ's calibration text uses seeds 1, 2, ..., so it never saw this text). *texts*: perplexity rise over "
         f"the {len(texts)} fixed paragraphs of benchmarks/perplexity.py ({sum(map(len, texts))} tokens, fp32 "
         f"{fp32_texts:.2f}). *greedy*: {TOKENS} greedy "
         f"tokens after {PROMPT!r} with qgraph's generator (KV cache): first position that differs from fp32's, "
         f"and how many positions are equal. *pipeline s*: the whole preset; *quantize s*: the pass alone"
         + (f" (GPTQ: calibration {' / '.join(seconds)} s of it)." if seconds else ".")
         + " Decode tok/s and TTFT: "
         f"{THREADS} threads, fresh child process per measurement, {args.rounds} interleaved rounds x "
         f"{args.repeats} generations, medians."),
        "",
        "| graph | budget text 48 (agree, ppl) | budget text 128 | texts ppl | first diff | greedy equal "
        "| pipeline s | quantize s | decode tok/s | TTFT ms | decode vs ort-int4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *(f"GPTQ pass note: {c}" for c in calibrations),
    ])
    if args.note:
        report += f"\n\n{args.note}"
    publish(SECTION, report, args.write)


if __name__ == "__main__":
    main()

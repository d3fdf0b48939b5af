"""quantize method=rtn vs method=gptq: int4 blocks of 32 on SmolLM2-135M, quality, pass time and decode speed.

    .venv/bin/python benchmarks/quantize_methods.py [--exports DIR] [--calibration-tokens N[,N...]] [--rounds 2]
                                                    [--write] [--note TEXT]

Both graphs are the ``ort-int4`` preset (blocks of 32 with zero points,
accuracy_level 4) on the same dynamo export (``--exports DIR`` reads
DIR/smollm2-dynamo/model.onnx; otherwise qgraph's export cache), one with
``quantize.method=rtn`` (the preset's default) and one with ``gptq``; the
``ort`` preset gives the fp32 graph they are compared with. Quality:

* *budget text*: what ``--verify`` checks (``qgraph.verify.budget``): greedy
  next-token agreement with fp32 and perplexity rise on the fp32 graph's own
  48-token greedy text (seed 0; GPTQ calibrates on other seeds' text), and the
  same on a 128-token text;
* *English*: perplexity rise on a fixed English paragraph (teacher-forced);
* *greedy*: of 64 greedy tokens after the demo prompt (qgraph's generator,
  KV cache), how many equal fp32's, and where the first difference is.

Speed: the ``quantize`` pass's own seconds (GPTQ: calibration included, in
the pass note), and decode tokens/s / TTFT of ``qgraph.runtime`` (2 threads;
each a fresh child process, interleaved rounds, medians), GPTQ as a ratio of
RTN measured in the same run.
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
from results_file import machine_description, publish  # noqa: E402

SECTION = "quantize methods: round to nearest vs GPTQ (int4, SmolLM2-135M)"
PROMPT = "In a quiet village at the edge of the forest, there lived a"  # qgraph demo's prompt
TOKENS = 64
THREADS = 2
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
        "faster than any scribe. Within fifty years, presses were running in more than two hundred European "
        "cities, and the price of books fell so sharply that reading spread well beyond monasteries and courts. "
        "Scholars could now compare identical copies of a text, which changed how knowledge was checked and shared.")
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


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    scores = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    return float(np.exp(-np.mean(log_probs[np.arange(len(ids) - 1), ids[1:]])))


def main() -> None:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--exports", type=Path, help="folder holding smollm2-dynamo/model.onnx")
    parser.add_argument("--calibration-tokens", default="",
                        help="comma-separated quantize.calibration_tokens, one GPTQ graph each (default: the pass's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if ran_as_child(args, _child):
        return

    import transformers

    from qgraph.verify.budget import Budget, Decoder, check_budget

    export = exported("smollm2-135m", "dynamo", args.exports, "smollm2-dynamo")
    english = np.array(transformers.AutoTokenizer.from_pretrained(export.parent)(TEXT)["input_ids"], np.int64)
    variants = [("fp32 (ort)", "ort", {}), ("int4 RTN (ort-int4)", "ort-int4", {"method": "rtn"})]
    for tokens in [int(t) for t in args.calibration_tokens.split(",") if t] or [None]:
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
        fp32_english = _perplexity(reference.all_positions(english), english)
        reference.close()
        for label, entry in list(built.items())[1:]:
            print(f"quality of {label} ...", file=sys.stderr)
            for tokens in (48, 128):
                verdict = check_budget(fp32, entry["model"], Budget(0.0, 100.0, 0.05, tokens))
                entry[f"budget{tokens}"] = (verdict.agreement, verdict.perplexity_rise)
            candidate = Decoder(entry["model"], label)
            entry["english"] = _perplexity(candidate.all_positions(english), english) / fp32_english - 1
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
        rows.append(f"| {label} | {a48:.1%}, {r48:+.1%} | {a128:.1%}, {r128:+.1%} | {entry['english']:+.1%} | "
                    f"{'none' if first is None else first} | {same}/{TOKENS} | {entry['pipeline_s']:.1f} | "
                    f"{entry['quantize_s']:.1f} | {decode:.1f} | {ttft:.1f} | "
                    f"{decode / speed[rtn_label][0]:.2f}x |")
    calibrations = [next((n for n in built[v[0]]["notes"] if n.startswith("gptq: calibrated")), "")
                    for v in variants[2:]]
    seconds = [m.group(1) for m in (re.search(r"in ([\d.]+) s$", c) for c in calibrations) if m]
    command = "`.venv/bin/python benchmarks/quantize_methods.py" + "".join(
        f" {flag} {value}" for flag, value in (("--exports", args.exports), ("--calibration-tokens",
                                                                             args.calibration_tokens))
        if value) + f" --rounds {args.rounds} --write`"
    report = "\n".join([
        f"Command: {command}",
        "",
        f"Machine: {machine_description(('onnx', 'onnxruntime', 'onnx-ir', 'numpy'))}.",
        "",
        (f"SmolLM2-135M (packaged Q4_1 GGUF dequantized to float32 by `qgraph export`, dynamo), presets `ort` "
         f"(fp32) and `ort-int4` (blocks of 32, zero points, accuracy_level 4) with `quantize.method` rtn or "
         f"gptq. *budget text 48 / 128*: greedy next-token agreement with fp32 and perplexity rise on the fp32 "
         f"graph's own greedy text from `qgraph.verify.budget`'s seed-0 prompt (what `--verify` checks; GPTQ's "
         f"calibration text uses seeds 1, 2, ..., so it never saw this text). *English*: perplexity rise on a "
         f"fixed {len(english)}-token English paragraph (fp32 {fp32_english:.2f}). *greedy*: {TOKENS} greedy "
         f"tokens after {PROMPT!r} with qgraph's generator (KV cache): first position that differs from fp32's, "
         f"and how many positions are equal. *pipeline s*: the whole preset; *quantize s*: the pass alone "
         f"(GPTQ: calibration {' / '.join(seconds) or '?'} s of it). Decode tok/s and TTFT: "
         f"{THREADS} threads, fresh child process per measurement, {args.rounds} interleaved rounds x "
         f"{args.repeats} generations, medians."),
        "",
        "| graph | budget text 48 (agree, ppl) | budget text 128 | English ppl | first diff | greedy equal "
        "| pipeline s | quantize s | decode tok/s | TTFT ms | decode vs RTN |",
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

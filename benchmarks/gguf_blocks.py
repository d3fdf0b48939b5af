"""GGUF blocks kept as MatMulNBits: the packaged Q4_1 SmolLM2 in int4 against the float graph of the same weights.

`qgraph export smollm2-135m` dequantizes the GGUF (Q4_1 blocks, a Q8_0
token embedding tied to the LM head) to float32. `quantize gguf=FILE` puts
the file's own blocks back as MatMulNBits weights (qgraph.gguf_blocks), so
the int4 graph should compute what the float graph computes, up to float
rounding: greedy tokens equal for the first 32 tokens of the demo prompt and
perplexity on a fixed text within 1 %. Round-to-nearest int4 of the same
float weights (the ort-int4 preset's quantize step) is measured alongside: it
re-rounds weights that were already rounded once.

    .venv/bin/python benchmarks/gguf_blocks.py [--exports DIR] [--write] [--note TEXT]

``--exports DIR`` reads DIR/smollm2-dynamo/model.onnx instead of exporting
(through qgraph's cache).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import benchmark_parser, exported  # noqa: E402
from results_file import machine_description, publish  # noqa: E402

SECTION = "GGUF blocks kept as MatMulNBits (quantize gguf=FILE)"
PROMPT = "In a quiet village at the edge of the forest, there lived a"  # qgraph demo's prompt
TOKENS = 32
# A fixed text the model did not write itself (teacher-forced perplexity).
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
        "faster than any scribe. Within fifty years, presses were running in more than two hundred European "
        "cities, and the price of books fell so sharply that reading spread well beyond monasteries and courts. "
        "Scholars could now compare identical copies of a text, which changed how knowledge was checked and shared.")
VARIANTS = [
    ("gguf blocks, accuracy_level 0", {"accuracy_level": 0}),
    ("gguf blocks, accuracy_level 4", {"accuracy_level": 4}),
    ("round to nearest int4 (ort-int4's quantize)", {"bits": 4, "block_size": 32, "accuracy_level": 4, "gguf": ""}),
]


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(sess, ids: list[int]) -> np.ndarray:
    array = np.array([ids], np.int64)
    return sess.run(["logits"], {"input_ids": array, "attention_mask": np.ones_like(array)})[0][0]


def greedy(sess, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(logits(sess, ids)[-1])))
    return ids[len(prompt):]


def perplexity(rows: np.ndarray, ids: list[int]) -> float:
    scores = rows[:-1].astype(np.float64)
    scores -= scores.max(-1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    return float(np.exp(-np.mean(log_probs[np.arange(len(ids) - 1), ids[1:]])))


def main() -> None:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--exports", type=Path, help="folder holding smollm2-dynamo/model.onnx")
    args = parser.parse_args()

    import transformers
    from qgraph_passes.quantize import QuantizePass

    from qgraph import io as qio
    from qgraph.export.sources import resolve
    from qgraph.verify.budget import Budget, check_budget

    export = exported("smollm2-135m", "dynamo", args.exports, "smollm2-dynamo")
    gguf_file = resolve("smollm2-135m").path
    tokenizer = transformers.AutoTokenizer.from_pretrained(export.parent)
    prompt = tokenizer(PROMPT)["input_ids"]
    text = tokenizer(TEXT)["input_ids"]

    work = Path(tempfile.mkdtemp(prefix="qgraph-gguf-bench-"))
    try:
        float_sess = session(export)
        started = time.perf_counter()
        float_tokens = greedy(float_sess, prompt, TOKENS)
        float_step = (time.perf_counter() - started) / TOKENS
        float_text = logits(float_sess, text)
        float_prompt = logits(float_sess, prompt)
        float_ppl = perplexity(float_text, text)
        del float_sess
        rows = []
        for label, options in VARIANTS:
            model = qio.load(export)
            started = time.perf_counter()
            step = QuantizePass(**{"gguf": str(gguf_file), **options})
            step(model)
            seconds = time.perf_counter() - started
            out = work / f"v{len(rows)}" / "model.onnx"
            out.parent.mkdir()
            qio.save(model, out, external_data=True, protect=[export])
            del model
            sess = session(out)
            started = time.perf_counter()
            tokens = greedy(sess, prompt, TOKENS)
            step_ms = (time.perf_counter() - started) / TOKENS * 1000
            same = next((i for i, (a, b) in enumerate(zip(tokens, float_tokens)) if a != b), TOKENS)
            ppl = perplexity(logits(sess, text), text)
            gap = float(np.abs(logits(sess, prompt) - float_prompt).max())
            del sess
            budget = check_budget(export, out, Budget(token_agreement=0.0, perplexity_rise=10.0))
            size = sum(p.stat().st_size for p in out.parent.iterdir()) / 2**20
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(step.report.rule_matches.items()) if k.startswith("gguf"))
            rows.append(f"| {label} | {kinds or 'rounded'} | {seconds:.1f} | {size:.0f} | {same}/{TOKENS} | "
                        f"{ppl:.3f} ({(ppl / float_ppl - 1):+.2%}) | {budget.agreement:.1%}, "
                        f"{budget.perplexity_rise:+.2%} | {gap:.2e} | {step_ms:.0f} |")
            print(rows[-1], file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    export_mib = sum(p.stat().st_size for p in export.parent.glob("model.onnx*")) / 2**20
    report = "\n".join([
        f"`.venv/bin/python benchmarks/gguf_blocks.py{' --exports ' + str(args.exports) if args.exports else ''}`: "
        f"the packaged SmolLM2-135M ({gguf_file.name}: Q4_1 layers, a Q8_0 token embedding tied to the LM head), "
        f"exported with dynamo (float32, {export_mib:.0f} MiB), then `quantize` on the no-cache graph. "
        f"*greedy*: of the first {TOKENS} greedy tokens after the demo prompt {PROMPT!r}, how many equal the float "
        f"graph's (all no-cache, onnxruntime CPU, 2 threads); float graph: {float_tokens[:8]}... "
        f"*ppl*: teacher-forced perplexity of a fixed {len(text)}-token English paragraph (float graph "
        f"{float_ppl:.3f}). *budget text*: `qgraph.verify.budget`'s fixed text (the float graph's own greedy "
        f"continuation), greedy agreement and perplexity rise. *max |dlogit|*: on the prompt, against the float "
        f"graph (logits up to ~{float(np.abs(float_prompt).max()):.0f}). *ms/token*: one greedy step of the "
        f"no-cache graph (the whole sequence again, 14-46 tokens; float graph {float_step * 1000:.0f} ms).",
        "",
        machine_description(("onnx", "onnxruntime", "onnx-ir", "gguf")),
        "",
        "| weights | GGUF blocks placed | pass s | MiB | greedy | ppl (vs float) | budget text | max abs dlogit "
        "| ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    if args.note:
        report += f"\n\n{args.note}"
    publish(SECTION, report, args.write)


if __name__ == "__main__":
    main()

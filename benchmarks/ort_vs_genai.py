"""qgraph's ort graphs (fp32, int8, int4) against onnxruntime-genai's model builder (fp32, int4) and transformers on SmolLM2-135M.

    .venv/bin/pip install onnxruntime-genai        # for this benchmark only; not a qgraph dependency
    .venv/bin/python benchmarks/ort_vs_genai.py [--rounds 3] [--repeats 2] [--max-new-tokens 64]
                                               [--out DIR] [--write] [--note TEXT]

Both sides start from the same weights: the packaged Q4_1 GGUF dequantized to
a float32 Hugging Face folder by qgraph's export cache. qgraph exports it
(dynamo, cached), runs the presets ``ort``, ``ort-int8`` and ``ort-int4``
exactly as ``qgraph demo`` runs a preset, and generates with
``qgraph.runtime`` (the code behind ``qgraph generate``). The builder
(``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``) builds
from the same folder, and onnxruntime-genai's own generator runs its graphs.
Hugging Face transformers is the third peer: the same folder in torch
(float32, ``torch.set_num_threads(2)``), ``model.generate`` greedy with the
same prompt and token count; a streamer stamps the time of each new token,
so TTFT and decode are read exactly as for the other two (its TTFT includes
``generate``'s own set-up, which a user of it pays too). transformers has
no int4/int8 CPU path for this folder without another package, so it runs
at fp32 only.

Each measurement is a fresh child process (its peak RSS is its own, VmHWM;
the child imports only what its peer needs: qgraph's child runs as the
``qgraph`` executable does -- started again with glibc's huge pages where
they apply (qgraph/huge_pages.py), sympy deferred -- and records whether
torch or transformers got imported: ``qgraph generate`` reads
tokenizer.json without them, ~300 MiB less). ``--huge-pages-rows`` adds
each side with the other's memory: qgraph's ort and ort-int4 with
``QGRAPH_HUGE_PAGES=0``, the builder's graphs with the tunable set, so the
table shows how much of a difference is the graph and how much the pages.
``--gguf-rows`` adds ``ort-int4`` on the packaged file's own Q4_1/Q8_0
blocks (``quantize.gguf``) at accuracy_level 0 (float activations: the
4-bit weights are the fp32 graph's exactly; the 8-bit LM head at 4, as
``compile(precision="gguf")`` builds it) and 4 (int8 activations
everywhere, as the builder's int4). Each process loads,
one short warm-up generation, then ``--repeats`` generations of
``--max-new-tokens`` greedy tokens with end-of-sequence ignored, 2 threads.
The configurations run in interleaved rounds (round 1: every graph, round
2: every graph, ..., each round in its own seeded order, so no engine
always follows the same one) and load on the machine spreads over all of
them; the table gives medians over every run of every round, and each target
line the ratio of the two sides' medians within each round (a pair run
seconds apart): the median ratio, a distribution-free interval for it and
how many rounds were above 1 (``benchmarks/paired.py``), and the range. TTFT = from
the prompt's ids to the first new token; decode = tokens after the first /
time from the first to the last. Model size = the files of the graph
(model.onnx + external data). Perplexity: each graph once, in its own
process, teacher-forced through its KV cache over the fixed paragraphs of
``benchmarks/perplexity.py``, so the int4 graphs' speed is read beside
what their rounding costs.

Targets of issue 19: decode tokens/s of qgraph's ort graph >= the builder's
at fp32 and at int4, TTFT no worse, greedy tokens identical at fp32; the
table has qgraph vs onnxruntime-genai vs transformers per precision.
``--write`` replaces the "ort vs onnxruntime-genai" section of RESULTS.md.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import benchmark_parser, huge_pages_mib, in_child, peak_rss_mib, ran_as_child
from paired import paired_summary
from results_file import machine_description, publish

SECTION = "ort vs onnxruntime-genai"
MODEL = "smollm2-135m"
PROMPT = "In a quiet village at the edge of the forest, there lived a"
THREADS = 2
QGRAPH_PRESETS = {"fp32": "ort", "int8": "ort-int8", "int4": "ort-int4"}
BUILDER_PRECISIONS = ("fp32", "int4")
TRANSFORMERS_PRECISIONS = ("fp32",)
QGRAPH, BUILDER, TRANSFORMERS = "qgraph ort", "onnxruntime-genai builder", "transformers (torch)"
NO_HUGE, WITH_HUGE = " (huge pages off)", " (huge pages on)"
TUNABLE = "glibc.malloc.hugetlb=1"  # qgraph.huge_pages.TUNABLE, given to the builder's process for its rows
GGUF_ROWS = "ort-int4 gguf blocks"  # --gguf-rows: ort-int4 with quantize.gguf (the packaged file's own blocks)
INSTALL = "pip install onnxruntime-genai   (into qgraph's venv: .venv/bin/pip install onnxruntime-genai)"


def _require_genai() -> None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise SystemExit(f"this benchmark compares with onnxruntime-genai, which is not installed.\n"
                         f"Install it for the benchmark only (it is not a qgraph dependency):\n    {INSTALL}") from None


def _size_mib(folder: Path) -> float:
    """The weights' files: the ONNX graph and its external data, or a Hugging Face folder's safetensors."""
    def weights(name: str) -> bool:
        return name.startswith("model.onnx") or name.endswith((".safetensors", ".bin"))

    return sum(f.stat().st_size for f in folder.iterdir() if weights(f.name)) / 2**20


# --- children -------------------------------------------------------------------------------------


def _summary(runs: list[tuple[float, float]], tokens: list[int]) -> dict[str, Any]:
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    return {"ttft": [r[0] for r in runs], "decode": [r[1] for r in runs], "tokens": tokens,
            "peak_rss_mib": peak_rss_mib(), "heavy_imports": heavy, "huge_pages_mib": huge_pages_mib()}


def _timed_runs(once: Any, task: dict[str, Any]) -> dict[str, Any]:
    """A short warm-up generation, then ``repeats`` timed ones: ``once(n)`` -> (ttft s, decode tok/s, tokens)."""
    once(4)
    runs, tokens = [], []
    for _ in range(task["repeats"]):
        ttft, decode, tokens = once(task["tokens"])
        runs.append((ttft, decode))
    return _summary(runs, tokens)


def _child_qgraph(task: dict[str, Any]) -> dict[str, Any]:
    from qgraph.huge_pages import restart_with_huge_pages

    restart_with_huge_pages(["generate"])  # as the qgraph executable does first (QGRAPH_HUGE_PAGES=0: not)
    from qgraph.deferred_imports import DEFERRED, defer

    for name in DEFERRED:  # as the qgraph executable does (qgraph.cli.entry), so the RSS is `qgraph generate`'s
        defer(name)
    from qgraph.runtime.generate import load_generator

    generator = load_generator(task["folder"], threads=THREADS)
    generator.eos_token_ids = frozenset()
    generator.generate([task["prompt"]], max_new_tokens=4)
    runs, tokens = [], []
    for _ in range(task["repeats"]):
        result = generator.generate([task["prompt"]], max_new_tokens=task["tokens"])
        runs.append((result.stats.ttft, result.stats.decode_tokens_per_second))
        tokens = list(result.token_ids[0])
    return _summary(runs, tokens)


def _child_genai(task: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(task["folder"])
    tokenizer = og.Tokenizer(model)
    ids = np.asarray(tokenizer.encode(task["prompt"]), np.int32)

    def once(n: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        out = [int(generator.get_next_tokens()[0])]
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        last = time.perf_counter()
        decode = (len(out) - 1) / (last - first) if len(out) > 1 else float("nan")
        return first - start, decode, out

    return _timed_runs(once, task)


def _child_transformers(task: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(task["folder"])
    model = AutoModelForCausalLM.from_pretrained(task["folder"], dtype=torch.float32).eval()
    ids = tokenizer(task["prompt"], return_tensors="pt")

    class Stamps(BaseStreamer):
        """generate() hands the prompt first, then each new token as it is chosen: stamp the new ones."""

        def __init__(self) -> None:
            self.prompt_seen, self.times = False, []

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def once(n: int) -> tuple[float, float, list[int]]:
        stamps = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=stamps,
                                 pad_token_id=tokenizer.eos_token_id)
        new = [int(t) for t in out[0, ids["input_ids"].shape[1]:]]
        first, last = stamps.times[0], stamps.times[-1]
        decode = (len(new) - 1) / (last - first) if len(new) > 1 else float("nan")
        return first - start, decode, new

    return _timed_runs(once, task)


def _child_perplexity(task: dict[str, Any]) -> dict[str, Any]:
    from perplexity import perplexity

    return {"perplexity": perplexity(Path(task["folder"]) / "model.onnx", task["texts"], THREADS)}


def _child(task: dict[str, Any]) -> dict[str, Any]:
    children = {"genai": _child_genai, "qgraph": _child_qgraph, "transformers": _child_transformers,
                "perplexity": _child_perplexity}
    return children[task["kind"]](task)


# --- building the graphs --------------------------------------------------------------------------


def _precision(preset: str) -> str:
    return "int4" if "int4" in preset else "int8" if "int8" in preset else "fp32"


def _qgraph_graphs(out: Path, presets: list[str], gguf_rows: bool) -> tuple[dict[str, Path], dict[str, float], Path]:
    from qgraph.demo import run_preset
    from qgraph.export import Progress, export_model
    from qgraph.export.cache import cache_root
    from qgraph.export.sources import dequantized_folder, resolve
    from qgraph.registry import default_registry

    registry = default_registry()
    print(f"exporting {MODEL} (dynamo; cached after the first time) ...", file=sys.stderr)
    exported = export_model(MODEL, out / "export", exporter="dynamo", progress=Progress())
    graphs, seconds = {}, {}
    for preset in presets:
        print(f"preset {preset} ...", file=sys.stderr)
        run = run_preset(preset, exported.output_dir, out / "qgraph", registry)
        graphs[preset], seconds[preset] = run.folder, run.report.seconds
    source = resolve(MODEL)
    for level in (0, 4) if gguf_rows else ():  # the packaged file's own Q4_1/Q8_0 blocks; 0 = compile(precision="gguf")
        label = f"{GGUF_ROWS} accuracy_level {level}" + (" (8-bit at 4)" if level == 0 else "")
        print(f"preset {label} ...", file=sys.stderr)
        run = run_preset("ort-int4", exported.output_dir, out / "qgraph", registry, label=f"gguf-level{level}",
                         options={"quantize": {"gguf": str(source.path), "accuracy_level": level,
                                               "accuracy_level_8bit": 4}})
        graphs[label], seconds[label] = run.folder, run.report.seconds
    hf_folder = dequantized_folder(source, cache_root(None), Progress(enabled=False))
    return graphs, seconds, hf_folder


def _builder_graphs(hf_folder: Path, out: Path) -> dict[str, Path]:
    graphs = {}
    for precision in BUILDER_PRECISIONS:
        folder = out / "genai" / precision
        if not (folder / "genai_config.json").exists():
            print(f"onnxruntime-genai builder, {precision} ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder),
                            "-o", str(folder), "-p", precision, "-e", "cpu", "-c", str(out / "genai" / "cache")],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        config_path = folder / "genai_config.json"
        config = json.loads(config_path.read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
        config_path.write_text(json.dumps(config, indent=4))
        graphs[precision] = folder
    return graphs


# --- report ---------------------------------------------------------------------------------------


def _row(label: str, precision: str, folder: Path, results: list[dict[str, Any]],
         perplexities: dict[str, float]) -> dict[str, Any]:
    return {
        "label": label, "precision": precision,
        "decode": statistics.median(d for r in results for d in r["decode"]),
        "ttft_ms": 1000 * statistics.median(t for r in results for t in r["ttft"]),
        "rss": statistics.median(r["peak_rss_mib"] for r in results),
        "size": _size_mib(folder), "tokens": results[-1]["tokens"],
        "heavy": sorted({m for r in results for m in r.get("heavy_imports", [])}),
        "round_decode": [statistics.median(r["decode"]) for r in results],
        "huge_mib": statistics.median(r.get("huge_pages_mib", 0.0) for r in results),
        "perplexity": perplexities.get(str(folder)),
    }


def format_report(rows: list[dict[str, Any]], args: Any, seconds: dict[str, float]) -> str:
    import onnxruntime_genai

    by = {(r["label"], r["precision"]): r for r in rows}
    lines = [
        f"Command: `.venv/bin/python benchmarks/ort_vs_genai.py --rounds {args.rounds} --repeats {args.repeats} "
        f"--max-new-tokens {args.max_new_tokens} --presets {args.presets} --prompt-repeat {args.prompt_repeat}"
        f"{' --huge-pages-rows' if args.huge_pages_rows else ''}{' --gguf-rows' if args.gguf_rows else ''} --write` "
        f"(onnxruntime-genai installed for it: `{INSTALL.split('   ')[0]}`)",
        "",
        f"Machine: {machine_description()}, onnxruntime-genai {onnxruntime_genai.__version__} "
        "(how busy it was: see the note at the end).",
        "",
        (f"SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized to float32 once; both sides start from that "
         f"folder). Prompt {args.prompt_repeat} x {args.base_prompt!r}, {args.max_new_tokens} greedy tokens, end-of-sequence ignored, "
         f"{THREADS} threads; each child process loads, warms up once, then generates {args.repeats} times; "
         f"{args.rounds} interleaved rounds (each in its own seeded order); medians over all runs (peak RSS: median over the rounds' processes)."),
        "",
        (f"*perplexity*: teacher-forced through each graph's own KV cache, one token at a time, over "
         f"{len(args.texts)} short paragraphs of different kinds ({sum(map(len, args.texts))} tokens; "
         f"benchmarks/perplexity.py), and its rise over the builder's fp32 graph's."),
        "",
        "| graph | precision | decode tok/s | TTFT ms | peak RSS MiB | in huge pages MiB | model MiB | perplexity "
        "| decode vs builder | TTFT vs builder | peak RSS vs builder |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fp32 = by[(BUILDER, "fp32")]["perplexity"]
    for r in rows:
        ref = by.get((BUILDER, r["precision"]))
        vs = (f"{r['decode'] / ref['decode']:.2f}x | {r['ttft_ms'] / ref['ttft_ms']:.2f}x | {r['rss'] / ref['rss']:.2f}x"
              if ref is not None and r["label"] != ref["label"] else "- | - | -")
        quality = "-" if r["perplexity"] is None else f"{r['perplexity']:.2f} ({r['perplexity'] / fp32 - 1:+.1%})"
        lines.append(f"| {r['label']} | {r['precision']} | {r['decode']:.1f} | {r['ttft_ms']:.1f} | {r['rss']:.0f} | "
                     f"{r['huge_mib']:.0f} | {r['size']:.0f} | {quality} | {vs} |")
    heavy = sorted({m for r in rows if r["label"].startswith("qgraph") for m in r["heavy"]})
    lines += ["", f"qgraph's child processes imported {', '.join(heavy)}." if heavy else
              "qgraph's child processes imported neither torch nor transformers: like `qgraph generate`, they read "
              "tokenizer.json with the tokenizers library."]
    lines += ["", "qgraph preset pipelines on the export: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
              + ".", "", "Targets of issue 19:", ""]
    builder = {p: by[(BUILDER, p)] for p in BUILDER_PRECISIONS}
    for r in rows:
        b = builder.get(r["precision"])
        if r["label"].startswith("qgraph") and b is not None:
            decode = "met" if r["decode"] >= b["decode"] else "NOT met"
            ttft = "met" if r["ttft_ms"] <= b["ttft_ms"] else "NOT met"
            paired = sorted(q / g for q, g in zip(r["round_decode"], b["round_decode"]))  # the same round's pair
            lines.append(f"- {r['label']} {r['precision']}: decode {r['decode']:.1f} vs {b['decode']:.1f} tok/s "
                         f"({decode}; per round {paired_summary(paired)}, from {paired[0]:.2f}x to "
                         f"{paired[-1]:.2f}x); TTFT {r['ttft_ms']:.1f} vs {b['ttft_ms']:.1f} ms ({ttft}); "
                         f"perplexity {r['perplexity']:.2f} vs {b['perplexity']:.2f}")
    b = builder["fp32"]["tokens"]
    for r in rows:
        if r["label"].startswith("qgraph"):
            q = r["tokens"]
            same = sum(1 for x, y in zip(q, b) if x == y)
            first = next((i for i, (x, y) in enumerate(zip(q, b)) if x != y), None)
            lines.append(f"- {r['label']} greedy tokens equal to the builder fp32's: {same}/{len(b)}"
                         + ("" if first is None else f" (first difference at token {first})"))
    t = builder["int4"]["tokens"]
    lines.append(f"- builder int4 greedy tokens equal to builder fp32's: {sum(1 for x, y in zip(t, b) if x == y)}/{len(b)}")
    for precision in TRANSFORMERS_PRECISIONS:
        if (QGRAPH, precision) not in by:  # the ort preset was not among --presets
            continue
        h, qr = by[(TRANSFORMERS, precision)], by[(QGRAPH, precision)]
        q = qr["tokens"]
        lines.append(f"- transformers {precision}: qgraph decode {qr['decode'] / h['decode']:.2f}x, TTFT "
                     f"{qr['ttft_ms'] / h['ttft_ms']:.2f}x of it; greedy tokens equal to qgraph's: "
                     f"{sum(1 for x, y in zip(h['tokens'], q) if x == y)}/{len(q)}")
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--rounds", type=int, default=3, metavar="N")
    parser.add_argument("--repeats", type=int, default=2, metavar="N")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--prompt-repeat", type=int, default=1, metavar="K",
                        help="the prompt is K copies of --prompt (K=78: about 1024 tokens, a long context)")
    parser.add_argument("--presets", default=",".join(QGRAPH_PRESETS.values()),
                        help="comma-separated qgraph presets to measure (e.g. ort,ort-attention,ort-int4,ort-int4-attention)")
    parser.add_argument("--out", metavar="DIR", help="keep the graphs here (and reuse the builder's on a rerun)")
    parser.add_argument("--gguf-rows", action="store_true",
                        help="also ort-int4 on the packaged GGUF's own blocks (quantize.gguf), accuracy_level 0 and 4")
    parser.add_argument("--huge-pages-rows", action="store_true",
                        help="also qgraph ort / ort-int4 without huge pages and the builder with them")
    args = parser.parse_args(argv)
    if ran_as_child(args, _child):
        return 0
    args.base_prompt = args.prompt
    args.prompt = " ".join([args.prompt] * args.prompt_repeat)
    _require_genai()
    with tempfile.TemporaryDirectory(prefix="qgraph-ort-genai-") as scratch:
        out = Path(args.out) if args.out else Path(scratch)
        if (out / "qgraph").exists():
            shutil.rmtree(out / "qgraph")
        ours, seconds, hf_folder = _qgraph_graphs(out, args.presets.split(","), args.gguf_rows)
        theirs = _builder_graphs(hf_folder, out)
        from perplexity import TEXTS
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
        args.texts = [tokenizer.encode(text).ids for text in TEXTS]
        configs = [(f"qgraph {p}", _precision(p), "qgraph", f, {}) for p, f in ours.items()]  # "qgraph ort" = QGRAPH
        configs += [(BUILDER, p, "genai", f, {}) for p, f in theirs.items()]
        if args.huge_pages_rows:  # each side with the other side's memory: where the difference comes from
            configs += [(f"qgraph {p}{NO_HUGE}", _precision(p), "qgraph", ours[p], {"QGRAPH_HUGE_PAGES": "0"})
                        for p in ("ort", "ort-int4") if p in ours]
            configs += [(BUILDER + WITH_HUGE, p, "genai", f, {"GLIBC_TUNABLES": TUNABLE}) for p, f in theirs.items()]
        configs += [(TRANSFORMERS, p, "transformers", hf_folder, {}) for p in TRANSFORMERS_PRECISIONS]
        results: dict[tuple[str, str], list[dict[str, Any]]] = {(c[0], c[1]): [] for c in configs}
        for round_ in range(args.rounds):  # each round in its own seeded order: no engine always runs first
            for label, precision, kind, folder, env in random.Random(round_).sample(configs, len(configs)):
                print(f"round {round_ + 1}/{args.rounds}: {label} {precision} ...", file=sys.stderr)
                task = {"kind": kind, "folder": str(folder), "prompt": args.prompt, "tokens": args.max_new_tokens,
                        "repeats": args.repeats}
                results[(label, precision)].append(in_child(__file__, task, env))
        perplexities = {}
        for folder in dict.fromkeys(str(c[3]) for c in configs if c[2] != "transformers"):
            print(f"perplexity of {folder} ...", file=sys.stderr)
            task = {"kind": "perplexity", "folder": folder, "texts": args.texts}
            perplexities[folder] = in_child(__file__, task)["perplexity"]
        rows = [_row(label, precision, folder, results[(label, precision)], perplexities)
                for label, precision, _, folder, _ in configs]
        report = format_report(rows, args, seconds)
    publish(SECTION, report, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

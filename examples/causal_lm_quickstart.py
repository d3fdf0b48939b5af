"""The seeds' notebook in qgraph: load a causal LM, compile it for both targets, generate, print the stats.

    python examples/causal_lm_quickstart.py                      # SmolLM2-135M (packaged)
    python examples/causal_lm_quickstart.py --model DIR          # any local Hugging Face folder or GGUF file
"""
from __future__ import annotations

import argparse

import qgraph

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="packaged name, Hugging Face folder or GGUF file")
parser.add_argument("--prompt-len", type=int, default=32)
parser.add_argument("--ctx-len", type=int, default=128)
parser.add_argument("--generation-len", type=int, default=32)
args = parser.parse_args()

# 1. Load: resolves the model and reads its config; nothing is exported yet.
model = qgraph.AutoModelForCausalLM.from_pretrained(args.model)
tokenizer = qgraph.load_hf_tokenizer(args.model)
prompts = ["My name is", "The capital of France is"]

for target in ("qaic", "ort"):
    # 2. Compile: export (cached) -> the target's preset -> sequence-replay check -> bundle folder.
    bundle = model.compile(target=target, prefill_seq_len=args.prompt_len, ctx_len=args.ctx_len)
    print(f"\n## target {target}: bundle {bundle}")
    # 3. Generate: streams the text, then prints the Performance Stats block.
    info = model.generate(prompts, tokenizer, generation_len=args.generation_len)
    print(f"perf_metrics: {info.perf_metrics}")

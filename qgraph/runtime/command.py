"""``qgraph generate`` and ``qgraph embed``: the command lines of the runtime.

Wired into ``qgraph`` by :func:`add_runtime_parsers` and :func:`run_generate` /
:func:`run_embed`. Exit codes follow the CLI contract: 0 done, 1 onnxruntime
failed while running, 2 bad input (no model or tokenizer where one is
needed, a graph that is not a language model or encoder, bad options).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from qgraph.errors import BadInputError

__all__ = ["add_runtime_parsers", "run_embed", "run_generate"]

_GENERATE_EPILOG = """\
DIR is a qgraph export folder (model.onnx + tokenizer) or the output folder of a
KV-cache pipeline; an .onnx file works when its tokenizer lies beside it or is
given with --tokenizer. The graph may be the no-cache export (the prefix is
recomputed every step), a concat-style or a retained-state KV-cache graph
(prefill in chunks of the specializations.json seq_len).
"""


def add_runtime_parsers(subparsers: Any) -> None:
    """Add ``generate`` and ``embed`` to an argparse sub-parser collection."""
    gen = subparsers.add_parser(
        "generate", help="generate text with a (KV-cached) graph in onnxruntime, with latency statistics",
        description="Generate text in onnxruntime: tokenize, prefill, decode, stream, and time it.",
        epilog=_GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("model", metavar="DIR", help="export folder or .onnx file")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable: a batch)")
    gen.add_argument("--prompts-file", metavar="FILE", help="prompts, one a line (empty lines skipped)")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    gen.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set of probability >= P")
    gen.add_argument("--seed", type=int, metavar="S", help="seed of the sampler (same seed, same text)")
    gen.add_argument("--repetition-penalty", type=float, metavar="R",
                     help="graphs that sample on the device (pass sampler): divide seen tokens' logits by R")
    gen.add_argument("--presence-penalty", type=float, metavar="P",
                     help="graphs that sample on the device: subtract P from generated tokens' logits")
    gen.add_argument("--min-p", type=float, metavar="M",
                     help="graphs that sample on the device: drop tokens below M times the top probability")
    gen.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model's folder)")
    gen.add_argument("--threads", type=int, default=2, metavar="N", help="onnxruntime intra-op threads (default 2)")
    gen.add_argument("--ctx-len", type=int, metavar="N", help="retained cache length when the graph leaves it symbolic")
    gen.add_argument("--prefill-chunk", type=int, metavar="N",
                     help="prefill chunk length (default: the graph's fixed seq_len or specializations.json)")
    gen.add_argument("--cache-binding", choices=("auto", "alias", "swap"), default="auto",
                     help="retained cache buffers: alias input and output, or swap two sets (default: auto)")
    gen.add_argument("--full-batch-size", type=int, metavar="N",
                     help="continuous batching: keep the graph's N cache rows busy, each prompt prefilled into a row "
                          "as soon as one is free (a graph made with kv-cache.full_batch_size=N)")
    gen.add_argument("--draft", metavar="DRAFT",
                     help="greedy speculative decoding: a smaller retained-state draft graph (folder or .onnx) "
                          "proposes tokens the target (DIR, kv-cache num_speculative_tokens=K) scores in one run")
    gen.add_argument("--speculative-tokens", type=int, default=4, metavar="K",
                     help="with --draft: draft tokens proposed per target run (default 4)")
    gen.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it comes")
    gen.add_argument("--json", metavar="R.json", help="write the tokens, texts and statistics as JSON")

    emb = subparsers.add_parser("embed", help="sentence embeddings of texts with an encoder export",
                                description="Sentence embeddings from an encoder export (pooling is in the graph).")
    emb.add_argument("model", metavar="DIR", help="export folder (qgraph export --task embedding) or .onnx file")
    emb.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text (repeatable)")
    emb.add_argument("--texts-file", metavar="FILE", help="texts, one a line (empty lines skipped)")
    emb.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model's folder)")
    emb.add_argument("--threads", type=int, default=2, metavar="N", help="onnxruntime intra-op threads (default 2)")
    emb.add_argument("--json", action="store_true", help="print the vectors as JSON")


def _read_lines(path: str, flag: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise BadInputError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    return [line for line in text.splitlines() if line.strip()]


def _check_threads(threads: int) -> None:
    if threads < 1:
        raise BadInputError(f"--threads must be at least 1, got {threads}")


def run_generate(args: argparse.Namespace, out: TextIO) -> int:
    from qgraph.runtime.generate import SamplingConfig, load_generator

    prompts = list(args.prompt) + (_read_lines(args.prompts_file, "--prompts-file") if args.prompts_file else [])
    if not prompts:
        raise BadInputError("give a prompt: --prompt TEXT or --prompts-file FILE")
    if args.max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise BadInputError(f"--prefill-chunk must be at least 1, got {args.prefill_chunk}")
    _check_threads(args.threads)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.draft is not None and args.full_batch_size is not None:
        raise BadInputError("--draft with --full-batch-size: the runtime does not yet drive speculative decoding "
                            "through continuous-batching rows (the graphs compose; run one or the other)")
    if args.draft is not None:
        from qgraph.runtime.speculative import load_speculative_generator

        if args.speculative_tokens < 0:
            raise BadInputError(f"--speculative-tokens must be >= 0, got {args.speculative_tokens}")
        generator = load_speculative_generator(args.model, args.draft, args.speculative_tokens,
                                               tokenizer=args.tokenizer, threads=args.threads, ctx_len=args.ctx_len,
                                               prefill_chunk=args.prefill_chunk, cache_binding=args.cache_binding)
    else:
        generator = load_generator(args.model, tokenizer=args.tokenizer, threads=args.threads, ctx_len=args.ctx_len,
                                   prefill_chunk=args.prefill_chunk, cache_binding=args.cache_binding)
    _device_penalties(args, generator.engine)
    print(f"# {generator.engine.label}: {generator.engine.describe()}; {sampling.describe()}", file=out)
    if args.full_batch_size is not None:
        return _serve(args, generator, prompts, sampling, out)
    stream = len(prompts) == 1 and not args.no_stream
    joint = "\n" if args.chat else ""  # a chat answer starts on its own line; a completion continues the prompt
    if stream:
        print(prompts[0], end=joint, file=out, flush=True)

    def show(row: int, piece: str) -> None:
        print(piece, end="", file=out, flush=True)

    result = generator.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, chat=args.chat,
                                on_text=show if stream else None)
    if stream:
        print(file=out)
    else:
        for row, (prompt, text) in enumerate(zip(prompts, result.texts, strict=True)):
            print(f"[{row}] {prompt}{joint}{text}", file=out)
    reasons = ", ".join(f"{r}" for r in result.stop_reasons) if len(prompts) > 1 else result.stop_reasons[0]
    print(f"\n(stopped: {reasons})", file=out)
    print(result.stats.format(), file=out)
    speculation = getattr(generator, "speculation", None)
    if speculation is not None:
        print(speculation.format(), file=out)
    if args.json:
        from qgraph.atomic import write_text_atomic

        data = {"model": str(generator.engine.label), "engine": generator.engine.describe(),
                "sampling": sampling.describe(), "prompts": prompts, **result.to_dict()}
        if speculation is not None:
            data["speculative"] = speculation.to_dict()
        write_text_atomic(Path(args.json), json.dumps(data, indent=2) + "\n")
    return 0


def _serve(args: argparse.Namespace, generator: Any, prompts: list[str], sampling: Any, out: TextIO) -> int:
    """``--full-batch-size N``: the prompts as a stream of requests through N cache rows."""
    from qgraph.runtime.batching import serve

    ids = [generator.encode(p, chat=args.chat) for p in prompts]
    result = serve(generator, ids, slots=args.full_batch_size, max_new_tokens=args.max_new_tokens,
                   sampling=sampling)
    joint = "\n" if args.chat else ""
    for row, (prompt, text, reason) in enumerate(zip(prompts, result.texts, result.stop_reasons, strict=True)):
        print(f"[{row}] {prompt}{joint}{text}  (stopped: {reason})", file=out)
    print(result.stats.format(), file=out)
    if args.json:
        from qgraph.atomic import write_text_atomic

        data = {"model": str(generator.engine.label), "engine": generator.engine.describe(),
                "sampling": sampling.describe(), "full_batch_size": args.full_batch_size, "prompts": prompts,
                **result.to_dict()}
        write_text_atomic(Path(args.json), json.dumps(data, indent=2) + "\n")
    return 0


def _device_penalties(args: argparse.Namespace, engine: Any) -> None:
    """--repetition-penalty / --presence-penalty / --min-p: only a graph that samples on the device has them."""
    given = {k: v for k, v in (("repetition_penalty", args.repetition_penalty),
                                ("presence_penalty", args.presence_penalty), ("min_p", args.min_p)) if v is not None}
    if not given:
        return
    if not getattr(engine, "samples_on_device", False):
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise BadInputError(f"{flags}: only for a graph that samples on the device (pass 'sampler'); "
                            f"{engine.label} outputs logits")
    from qgraph.runtime.sampling import DevicePenalties

    engine.penalties = DevicePenalties(**given)


def run_embed(args: argparse.Namespace, out: TextIO) -> int:
    from qgraph.runtime.embed import EmbeddingModel, cosine_similarity

    texts = list(args.text) + (_read_lines(args.texts_file, "--texts-file") if args.texts_file else [])
    if not texts:
        raise BadInputError("give a text: --text TEXT or --texts-file FILE")
    _check_threads(args.threads)
    model = EmbeddingModel.load(args.model, tokenizer=args.tokenizer, threads=args.threads)
    vectors = model.embed(texts)
    if args.json:
        data = {"model": model.label, "dim": int(vectors.shape[1]),
                "embeddings": [{"text": t, "vector": v.tolist()} for t, v in zip(texts, vectors, strict=True)]}
        print(json.dumps(data), file=out)
        return 0
    for row, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        head = ", ".join(f"{x:+.4f}" for x in vector[:6])
        print(f"[{row}] {text!r}: dim {vector.size}, norm {float((vector.astype('float64') ** 2).sum()) ** 0.5:.4f}, "
              f"[{head}, ...]", file=out)
    if len(texts) > 1:
        sims = cosine_similarity(vectors, vectors)
        print("cosine similarity:", file=out)
        for row in range(len(texts)):
            print(f"  [{row}] " + "  ".join(f"{s:+.4f}" for s in sims[row]), file=out)
    return 0

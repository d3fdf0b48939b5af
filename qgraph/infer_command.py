"""``qgraph infer``, ``qgraph compile`` and ``qgraph execute``: the seeds' command line over :mod:`qgraph.auto`.

    qgraph infer --model-name smollm2-135m --prompt "My name is|The sky is" --prompt-len 32 --ctx-len 128
    qgraph compile --model-name smollm2-135m --target ort        # prints the bundle folder
    qgraph execute BUNDLE --prompt "My name is" --generation-len 20

Each does through the Python API exactly what a script would (the results
are the same tokens), prints the generated text and the Performance Stats
block, and ``--json FILE`` writes texts, ids and metrics for other tools.
Exit codes follow the CLI contract: 2 for bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from qgraph.errors import BadInputError

__all__ = ["COMMANDS", "add_infer_parsers", "run_infer_command"]

COMMANDS = ("infer", "compile", "execute")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-name", metavar="NAME",
                        help="packaged name (smollm2-135m), Hugging Face folder or GGUF file")
    parser.add_argument("--local-model-dir", metavar="DIR",
                        help="the model's local folder (or GGUF file); --model-name is then only its label")
    parser.add_argument("--target", default="qaic", metavar="NAME", help="qaic (default) or ort")
    parser.add_argument("--precision", default="fp32", metavar="P",
                        help="weights: fp32 (default), or on target ort int8 / int4 (MatMulNBits, rounded) "
                             "or gguf (a GGUF model's own blocks)")
    parser.add_argument("--prompt-len", type=int, default=32, metavar="N", help="prefill seq_len (default 32)")
    parser.add_argument("--ctx-len", type=int, default=128, metavar="N", help="context length (default 128)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="prompts run together (default 1)")
    parser.add_argument("--full-batch-size", type=int, default=None, metavar="N",
                        help="continuous batching: N cache rows kept busy, each prompt prefilled into a row as soon "
                             "as one is free (target qaic)")
    parser.add_argument("--kv-dtype", default="float16", metavar="DTYPE",
                        help="KV precision for the device files: float16 (default), float32, mxint8 or model")
    parser.add_argument("--exporter", default="dynamo", metavar="NAME", help="dynamo (default) or torchscript")
    parser.add_argument("--verify-examples", type=int, default=3, metavar="N",
                        help="sequences replayed against the export before the bundle is kept (default 3)")


def _prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", metavar="TEXT", help="prompts separated by |")
    parser.add_argument("--prompts-txt-file-path", metavar="FILE", help="a file with one prompt a line")
    parser.add_argument("--generation-len", type=int, default=None, metavar="N",
                        help="tokens to generate per prompt (default: until EOS or ctx_len)")
    parser.add_argument("--json", metavar="FILE", help="also write texts, ids and metrics as JSON")


def add_infer_parsers(subparsers: Any) -> None:
    infer = subparsers.add_parser("infer", help="model name -> compiled bundle -> generated text and stats",
                                  description="Export (cached), compile for a target, verify, and generate.")
    _model_arguments(infer)
    _prompt_arguments(infer)
    comp = subparsers.add_parser("compile", help="compile a model into a verified bundle folder (printed)")
    _model_arguments(comp)
    execute = subparsers.add_parser("execute", help="run prompts through a compiled bundle")
    execute.add_argument("bundle", metavar="BUNDLE")
    execute.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the bundle's)")
    _prompt_arguments(execute)


def _model(args: argparse.Namespace) -> Any:
    from qgraph.auto import AutoModelForCausalLM

    spec = args.local_model_dir or args.model_name
    if not spec:
        raise BadInputError("give --model-name (a packaged name or a path) or --local-model-dir")
    return AutoModelForCausalLM.from_pretrained(spec, exporter=args.exporter,
                                                continuous_batching=args.full_batch_size is not None)


def _compile(model: Any, args: argparse.Namespace) -> Path:
    return model.compile(target=args.target, prefill_seq_len=args.prompt_len, ctx_len=args.ctx_len,
                         batch_size=args.batch_size, kv_dtype=args.kv_dtype, verify_examples=args.verify_examples,
                         full_batch_size=args.full_batch_size, precision=args.precision)


def _check_prompts(args: argparse.Namespace) -> list[str]:
    from qgraph.auto import read_prompts

    if args.generation_len is not None and args.generation_len < 1:
        raise BadInputError(f"--generation-len must be at least 1, got {args.generation_len}")
    return read_prompts(args.prompt, args.prompts_txt_file_path)


def _options(args: argparse.Namespace) -> Any:
    from qgraph.bundle import CompileOptions

    # precision gguf: the file is the model's own, known once it is resolved (compile checks it is GGUF)
    gguf = {"quantize": {"gguf": "(the model's GGUF file)"}} if args.precision == "gguf" else {}
    return CompileOptions(target=args.target, prefill_seq_len=args.prompt_len, ctx_len=args.ctx_len,
                          batch_size=args.batch_size, kv_dtype=args.kv_dtype, verify_examples=args.verify_examples,
                          full_batch_size=args.full_batch_size, precision=args.precision, pass_options=gguf)


def _check_lengths(model: Any, prompts: list[str], options: Any) -> None:
    """Before anything is exported or compiled: every prompt must fit the context (the model's own tokenizer)."""
    from qgraph.auto import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(model.source.path if model.source.kind == "folder" else model.source.spec)
    room = options.ctx_len - 1 if options.target == "qaic" else options.ctx_len
    for row, prompt in enumerate(prompts):
        n = len(tokenizer(prompt)["input_ids"])
        if n > room:
            raise BadInputError(f"prompt {row} has {n} tokens; --ctx-len {options.ctx_len} holds at most {room} "
                                f"on target {options.target}")


def _report(info: Any, args: argparse.Namespace, out: TextIO) -> int:
    if args.json:
        Path(args.json).write_text(json.dumps(info.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=out)
    return 0


def run_infer_command(args: argparse.Namespace, out: TextIO) -> int:
    from qgraph.auto import exec_kv

    if args.command == "infer":
        prompts = _check_prompts(args)
        options = _options(args)
        model = _model(args)
        _check_lengths(model, prompts, options)
        bundle = _compile(model, args)
        print(f"bundle: {bundle}", file=out)
        return _report(exec_kv(None, bundle, prompt=prompts, generation_len=args.generation_len, out=out), args, out)
    if args.command == "compile":
        bundle = _compile(_model(args), args)
        print(bundle, file=out)
        return 0
    if args.command == "execute":
        prompts = _check_prompts(args)
        info = exec_kv(args.tokenizer, args.bundle, prompt=prompts, generation_len=args.generation_len, out=out)
        return _report(info, args, out)
    raise BadInputError(f"unknown command {args.command}")

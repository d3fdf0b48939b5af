"""The efficient-transformers flow in qgraph: ``from_pretrained -> compile -> generate``.

    import qgraph
    model = qgraph.AutoModelForCausalLM.from_pretrained("smollm2-135m")
    model.compile(target="qaic", prefill_seq_len=32, ctx_len=128)   # -> bundle folder
    info = model.generate(["Hello, my name is"])                     # texts, ids, perf_metrics

``from_pretrained`` only resolves the model (a packaged name, a local Hugging
Face folder or a GGUF file) and reads its config: nothing is exported until
``export`` or ``compile`` needs it. ``compile`` runs the target's preset with
the KV-cache options given, checks the result by sequence replay against the
export and publishes a bundle (:mod:`qgraph.bundle`); ``generate`` runs the
bundle on its backend (:mod:`qgraph.runtime.backend`) in groups of
``batch_size`` prompts -- a last group that is not full is run too.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from qgraph.errors import BadInputError

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "CommonLoader",
    "ExecInfo",
    "PerfMetrics",
    "exec_kv",
    "load_hf_tokenizer",
    "read_prompts",
]

#: Serving features of QEfficient's API that qgraph does not have yet, with the argument that asks for each.
_NOT_YET = {
    "continuous_batching": "continuous batching",
    "full_batch_size": "continuous batching (full_batch_size)",
    "num_speculative_tokens": "speculative decoding (num_speculative_tokens)",
}
#: Keyword arguments of from_pretrained that are qgraph export options.
_EXPORT_KWARGS = ("attn_implementation", "wrapper", "opset")


def _refuse_unbuilt(**given: Any) -> None:
    for name, value in given.items():
        if value not in (None, False):
            raise BadInputError(f"{_NOT_YET[name]} is not implemented in qgraph yet ({name}={value!r}); "
                                "drop the argument to serve one batch at a time")


def _split_hf_kwargs(hf_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(hf_kwargs) - set(_EXPORT_KWARGS))
    if unknown:
        raise BadInputError(f"from_pretrained does not take {', '.join(unknown)}: qgraph loads models offline "
                            f"with their own config; it accepts {', '.join(_EXPORT_KWARGS)}")
    return dict(hf_kwargs)


def _task_of(source: Any) -> str:
    """causal-lm or embedding, from the config alone (GGUF files hold causal LMs)."""
    if source.kind == "gguf":
        return "causal-lm"
    from qgraph.export.sources import _quiet_transformers, check_supported, detect_task

    check_supported(source)
    from transformers import AutoConfig

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(os.fspath(source.path))
    return detect_task(config, source.path)


def _default_export_dir(source: Any, exporter: str, task: str, extra: Mapping[str, Any]) -> Path:
    from qgraph.export import cache

    key = cache.key_of({"path": os.fspath(source.path), "exporter": exporter, "task": task, "extra": dict(extra)})
    return cache.cache_root() / "models" / key


class _Loaded:
    """What both auto classes share: the resolved source, the export, the compiled bundle."""

    task = ""

    def __init__(self, source: Any, *, exporter: str, export_options: Mapping[str, Any]) -> None:
        self.source = source
        self.exporter = exporter
        self.export_options = dict(export_options)
        self.export_dir: Path | None = None
        self.bundle: Path | None = None
        self.manifest: dict[str, Any] | None = None

    @classmethod
    def _resolve(cls, name_or_path: str | os.PathLike[str], exporter: str) -> Any:
        from qgraph.export.exporters import EXPORTERS
        from qgraph.export.sources import resolve

        if exporter not in EXPORTERS:
            raise BadInputError(f"unknown exporter {exporter!r} (known: {', '.join(EXPORTERS)})")
        source = resolve(name_or_path)
        task = _task_of(source)
        if task != cls.task:
            other = "qgraph.AutoModel" if task == "embedding" else "qgraph.AutoModelForCausalLM"
            raise BadInputError(f"{name_or_path} is {'an encoder' if task == 'embedding' else 'a causal LM'} "
                                f"(task {task}), not what {cls.__name__} loads; use {other} "
                                "(or qgraph.CommonLoader, which picks the class from the config)")
        return source

    @property
    def model_name(self) -> str:
        return self.source.spec

    def export(self, export_dir: str | os.PathLike[str] | None = None) -> Path:
        """The no-cache export (cached by content); returns its folder."""
        from qgraph.export import Progress, export_model

        folder = Path(export_dir) if export_dir is not None else _default_export_dir(
            self.source, self.exporter, self.task, self.export_options)
        result = export_model(self.source.spec, folder, exporter=self.exporter, task=self.task,
                              progress=Progress(), **self.export_options)
        self.export_dir = result.output_dir
        return self.export_dir

    def _require_bundle(self) -> Path:
        if self.bundle is None:
            raise BadInputError(f"{type(self).__name__}: call compile() before generate()")
        return self.bundle

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source.describe()}, bundle={self.bundle})"


class AutoModelForCausalLM(_Loaded):
    """A causal LM on its way to a compiled, verified bundle."""

    task = "causal-lm"

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, exporter: str = "dynamo",
                        continuous_batching: bool = False, **hf_kwargs: Any) -> AutoModelForCausalLM:
        """A packaged name, a local Hugging Face folder or a GGUF file; nothing is exported yet.

        ``hf_kwargs``: the export options ``attn_implementation``, ``wrapper``, ``opset``.
        """
        options = _split_hf_kwargs(hf_kwargs)
        model = cls(cls._resolve(name_or_path, exporter), exporter=exporter, export_options=options)
        model.continuous_batching = bool(continuous_batching)
        return model

    continuous_batching = False

    def compile(self, *, target: str = "qaic", prefill_seq_len: int = 32, ctx_len: int = 128, batch_size: int = 1,
                kv_dtype: str = "float16", full_batch_size: int | None = None,
                comp_ctx_lengths: Sequence[int] | None = None, num_speculative_tokens: int | None = None,
                verify_examples: int = 3, precision: str = "fp32", **pass_options: Mapping[str, Any]) -> Path:
        """The target's preset, verified, as a bundle folder (a repeated request returns the same folder at once).

        ``full_batch_size``: cache rows of a continuous-batching bundle (the
        model loaded with ``continuous_batching=True``, as in QEfficient);
        ``comp_ctx_lengths``: compute-context lengths, one specialization each.
        ``precision``: "fp32", or (target ``ort``) "int8" / "int4": the
        ``ort-int8`` / ``ort-int4`` preset, weight-only MatMulNBits rounded
        to nearest, or "gguf" (a GGUF model): ``ort-int4`` with the file's
        own Q4_0/Q4_1/Q8_0 blocks and float activations (accuracy_level 0,
        the 8-bit blocks at 4: onnxruntime has no float 8-bit kernel, unless
        ``quantize`` says otherwise); part of the bundle's key.
        ``pass_options``: per pass, its options, the pass name with ``_`` for
        ``-`` (``fp16_clip={"activations": True}``, ``quantize={"symmetric": False}``).
        """
        from qgraph.bundle import CompileOptions, compile_decoder

        _refuse_unbuilt(num_speculative_tokens=num_speculative_tokens)
        if self.continuous_batching and full_batch_size is None:
            raise BadInputError("full_batch_size is required: the model was loaded with continuous_batching=True")
        if full_batch_size is not None and not self.continuous_batching:
            raise BadInputError("full_batch_size needs a model loaded with continuous_batching=True")
        if precision == "gguf":  # the GGUF's own blocks, found by value in the export (qgraph.gguf_blocks)
            if self.source.kind != "gguf":
                raise BadInputError(f"precision gguf keeps a GGUF file's blocks; {self.source.spec} is not a GGUF model")
            # accuracy_level 0: onnxruntime's float path. At 4 (the preset's, int8 activations) SmolLM2's greedy
            # tokens leave the float graph's after 9 of 32 (benchmarks/RESULTS.md); the blocks alone keep all 32.
            # The 8-bit blocks (a Q8_0 LM head) at 4: onnxruntime has no float 8-bit kernel and would dequantize
            # the whole 576 x 49152 head every step (~150 ms); with it at 4, 32 of 32 tokens still equal.
            pass_options = {**pass_options, "quantize": {"accuracy_level": 0, "accuracy_level_8bit": 4,
                                                         **pass_options.get("quantize", {}),
                                                         "gguf": str(self.source.path)}}
        options = CompileOptions(target=target, prefill_seq_len=prefill_seq_len, ctx_len=ctx_len,
                                 batch_size=batch_size, kv_dtype=kv_dtype, verify_examples=verify_examples,
                                 full_batch_size=full_batch_size,
                                 comp_ctx_lengths=tuple(sorted(set(comp_ctx_lengths or ()))), precision=precision,
                                 pass_options={k.replace("_", "-"): v for k, v in pass_options.items()})
        compiled = compile_decoder(self.export(self.export_dir), options)
        self.bundle, self.manifest = compiled.path, compiled.manifest
        return compiled.path

    def generate(self, prompts: str | Sequence[str], tokenizer: Any = None, *, generation_len: int | None = None,
                 stream: bool = True, out: TextIO | None = None) -> ExecInfo:
        """Greedy generation through the compiled bundle; ``tokenizer`` defaults to the bundle's."""
        return exec_kv(tokenizer, self._require_bundle(), prompt=prompts, generation_len=generation_len,
                       stream=stream, out=out)


class AutoModel(_Loaded):
    """An encoder whose pooled (and optionally normalized) sentence embedding is in the graph."""

    task = "embedding"

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, pooling: str | None = None,
                        normalize: bool | None = None, exporter: str = "dynamo", **hf_kwargs: Any) -> AutoModel:
        """``pooling``: "mean", "cls" or "max" (default: what the folder declares, else mean)."""
        from qgraph.export.interface import POOLINGS

        if pooling is not None and pooling not in POOLINGS:
            raise BadInputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        options = _split_hf_kwargs(hf_kwargs)
        options.update(pooling=pooling, normalize=normalize)
        return cls(cls._resolve(name_or_path, exporter), exporter=exporter, export_options=options)

    def compile(self, *, seq_len: int | Sequence[int] = 32, verify_examples: int = 3) -> Path:
        """A bundle with one specialization per sequence length; inputs are padded to the smallest that fits."""
        from qgraph.bundle import EncoderOptions, compile_encoder

        lengths = (seq_len,) if isinstance(seq_len, int) else tuple(seq_len)
        options = EncoderOptions(seq_lens=lengths, verify_examples=verify_examples)
        compiled = compile_encoder(self.export(self.export_dir), options)
        self.bundle, self.manifest = compiled.path, compiled.manifest
        return compiled.path

    def generate(self, inputs: str | Sequence[str]) -> np.ndarray:
        """The pooled vectors [len(inputs), hidden] of the texts."""
        return embed_bundle(self._require_bundle(), inputs)


class CommonLoader:
    """Picks :class:`AutoModelForCausalLM` or :class:`AutoModel` from the model's config."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike[str], **kwargs: Any) -> AutoModelForCausalLM | AutoModel:
        from qgraph.export.sources import resolve

        task = _task_of(resolve(name_or_path))
        cls = AutoModelForCausalLM if task == "causal-lm" else AutoModel
        return cls.from_pretrained(name_or_path, **kwargs)


# --- running a bundle ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerfMetrics:
    """The latency figures of one ``generate`` (seconds and tokens per second).

    ``ttft``: the average over the batches run of the time to each batch's
    first token; the rates and ``end_to_end`` cover all batches together.
    """

    ttft: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    total_tokens_per_second: float
    end_to_end: float

    @classmethod
    def from_batches(cls, parts: Sequence[Any]) -> PerfMetrics:
        """``parts``: the LatencyStats of each batch run; TTFT is their average, rates are over the whole run."""
        from qgraph.runtime.stats import LatencyStats

        total = LatencyStats.combine(list(parts))
        return cls(total.ttft / len(parts), total.prefill_tokens_per_second, total.decode_tokens_per_second,
                   total.total_tokens_per_second, total.end_to_end)


@dataclasses.dataclass
class ExecInfo:
    """What ``generate`` returns: per prompt the text and ids, and the run's metrics."""

    batch_size: int
    generated_texts: list[str]
    generated_ids: list[list[int]]
    perf_metrics: PerfMetrics
    prompts: list[str]
    stop_reasons: list[str]
    stats: Any = dataclasses.field(repr=False, default=None)  #: the full LatencyStats

    def format_stats(self) -> str:
        m = self.perf_metrics
        bar = "=" * 25
        return "\n".join([
            f"{bar} Performance Stats {bar}",
            f"Average Prefill time (TTFT) is = {m.ttft:.4f} sec",
            f"Prefill is = {m.prefill_tokens_per_second:.2f} tokens/sec",
            f"Decode is = {m.decode_tokens_per_second:.2f} tokens/sec",
            f"Total is = {m.total_tokens_per_second:.2f} tokens/sec",
            f"Total (E2E) inference time is = {m.end_to_end:.4f} sec",
            "=" * (2 * len(bar) + 19),
        ])

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "prompts": self.prompts, "generated_texts": self.generated_texts,
                "generated_ids": self.generated_ids, "stop_reasons": self.stop_reasons,
                "perf_metrics": dataclasses.asdict(self.perf_metrics)}

    def __str__(self) -> str:
        return self.format_stats()


def read_prompts(prompt: str | Sequence[str] | None = None,
                 prompts_txt_file_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Prompts from a ``|``-separated string, a list, or a text file (one prompt a line, blank lines skipped)."""
    if (prompt is None) == (prompts_txt_file_path is None):
        raise BadInputError("give either prompt or prompts_txt_file_path (exactly one)")
    if prompts_txt_file_path is not None:
        path = Path(prompts_txt_file_path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise BadInputError(f"{path}: cannot read the prompts file ({error})") from None
        prompts = [line for line in lines if line.strip()]
    elif isinstance(prompt, str):
        prompts = prompt.split("|")
    else:
        prompts = list(prompt)
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise BadInputError(f"every prompt must be a non-empty string, got {prompts!r}")
    return prompts


def load_hf_tokenizer(pretrained_model_name_or_path: str | os.PathLike[str], *, padding_side: str = "right",
                      **kwargs: Any) -> Any:
    """A Hugging Face tokenizer; one without a pad token gets its end-of-sequence token as pad token.

    Takes a tokenizer folder (a qgraph export or bundle, a Hugging Face
    folder), a GGUF file or a packaged name.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise BadInputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    path = Path(pretrained_model_name_or_path)
    if path.is_dir():
        folder, extra = path, {}
    else:
        from qgraph.export.sources import resolve

        source = resolve(pretrained_model_name_or_path)
        folder, extra = ((source.path.parent, {"gguf_file": source.path.name}) if source.kind == "gguf"
                         else (source.path, {}))
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(folder), padding_side=padding_side, **extra, **kwargs)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for broken folders
        raise BadInputError(f"{pretrained_model_name_or_path}: cannot load its tokenizer: {error}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # the seeds' rule; without either token, padding stays undefined
    return tokenizer


def exec_kv(tokenizer: Any, bundle: str | os.PathLike[str], *, prompt: str | Sequence[str] | None = None,
            prompts_txt_file_path: str | os.PathLike[str] | None = None, generation_len: int | None = None,
            stream: bool = True, out: TextIO | None = None) -> ExecInfo:
    """Run a compiled causal-LM bundle on prompts, without the model object.

    ``tokenizer``: a tokenizer object, a path to load one from, or None (the
    bundle's own). ``generation_len``: tokens to generate per prompt (default:
    until EOS or the bundle's ctx_len). Prompts run in groups of the bundle's
    batch_size; the last group runs even when it is not full.
    """
    from qgraph.bundle import read_bundle
    from qgraph.runtime.backend import get_backend
    from qgraph.runtime.stats import LatencyStats

    manifest = read_bundle(bundle)
    if manifest.get("kind") != "causal-lm":
        raise BadInputError(f"{bundle}: an {manifest.get('kind')} bundle; exec_kv runs causal-LM bundles")
    prompts = read_prompts(prompt, prompts_txt_file_path)
    if generation_len is not None and (isinstance(generation_len, bool) or not isinstance(generation_len, int)
                                       or generation_len < 1):
        raise BadInputError(f"generation_len must be a positive integer, got {generation_len!r}")
    options = manifest["options"]
    ctx_len, batch_size = int(options["ctx_len"]), int(options["batch_size"])
    generator = get_backend(manifest["backend"], target=manifest["target"]).load_generator(bundle, ctx_len=ctx_len)
    if tokenizer is not None:
        generator.tokenizer = tokenizer if not isinstance(tokenizer, (str, os.PathLike)) else load_hf_tokenizer(
            tokenizer)
    ids = [generator.encode(p) for p in prompts]
    limit = generator.engine.max_tokens
    for row, seq in enumerate(ids):  # before any run: a prompt the cache cannot hold is the caller's mistake
        if limit is not None and len(seq) > limit:
            raise BadInputError(f"prompt {row} has {len(seq)} tokens; the bundle (ctx_len {ctx_len}) holds at most "
                                f"{limit} tokens a row")
    out = out or sys.stdout
    max_new = generation_len or ctx_len
    if options.get("full_batch_size"):
        return _serve_bundle(generator, prompts, ids, int(options["full_batch_size"]), max_new, stream, out)
    tokens: list[list[int]] = []
    reasons: list[str] = []
    parts = []
    for first in range(0, len(prompts), batch_size):
        group = ids[first:first + batch_size]
        on_token = None
        if stream:
            print(f"\nPrompt {first}: {prompts[first]}" if len(group) == 1 else
                  f"\nPrompts {first}-{first + len(group) - 1} (batch {len(group)})", file=out, flush=True)
            if len(group) == 1:
                from qgraph.runtime.generate import _TextStream

                on_token = _TextStream(generator.tokenizer, 1, lambda _row, piece: print(piece, end="", file=out,
                                                                                        flush=True))
        result = generator.generate_ids(group, max_new_tokens=max_new, on_token=on_token)
        tokens += result.token_ids
        reasons += result.stop_reasons
        parts.append(result.stats)
    texts = [generator.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    info = ExecInfo(batch_size, texts, tokens, PerfMetrics.from_batches(parts), prompts, reasons,
                    LatencyStats.combine(parts))
    if stream:
        print(file=out)
        for row, (p, text) in enumerate(zip(prompts, texts, strict=True)):
            print(f"[{row}] {p!r} -> {text!r}", file=out)
        print(info.format_stats(), file=out, flush=True)
    return info


def _serve_bundle(generator: Any, prompts: list[str], ids: list[list[int]], slots: int, max_new: int, stream: bool,
                  out: TextIO) -> ExecInfo:
    """A continuous-batching bundle: the prompts as a stream of requests through its cache rows."""
    from qgraph.runtime.batching import serve

    result = serve(generator, ids, slots=slots, max_new_tokens=max_new)
    s = result.stats
    metrics = PerfMetrics(s.mean_ttft, s.prompt_tokens / s.prefill_seconds if s.prefill_seconds else float("nan"),
                          s.decode_tokens_per_second, s.tokens_per_second, s.seconds)
    info = ExecInfo(slots, result.texts, result.token_ids, metrics, prompts, result.stop_reasons, s)
    if stream:
        for row, (p, text) in enumerate(zip(prompts, result.texts, strict=True)):
            print(f"[{row}] {p!r} -> {text!r}", file=out)
        print(s.format(), file=out)
        print(info.format_stats(), file=out, flush=True)
    return info


def embed_bundle(bundle: str | os.PathLike[str], inputs: str | Sequence[str]) -> np.ndarray:
    """Pooled vectors of ``inputs`` through an encoder bundle, each batch padded to its specialization."""
    from qgraph.bundle import read_bundle
    from qgraph.runtime.backend import get_backend

    manifest = read_bundle(bundle)
    if manifest.get("kind") != "embedding":
        raise BadInputError(f"{bundle}: a {manifest.get('kind')} bundle, not an encoder bundle")
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts or any(not isinstance(t, str) for t in texts):
        raise BadInputError(f"inputs must be a string or a list of strings, got {inputs!r}")
    embedder = get_backend(manifest["backend"], target="embedding").load_embedder(bundle)
    feeds = embedder.batch(texts)
    width = feeds["input_ids"].shape[1]
    lengths = manifest["options"]["seq_lens"]
    fitting = [n for n in lengths if n >= width]
    if not fitting:
        raise BadInputError(f"an input has {width} tokens; the bundle is compiled for seq_len {lengths} "
                            "(compile with a larger seq_len)")
    pad = fitting[0] - width  # right padding, masked out
    feeds = {name: np.pad(value, ((0, 0), (0, pad)), constant_values=embedder.pad_token_id if name == "input_ids"
                          else 0) for name, value in feeds.items()}
    (vectors,) = embedder.session.run(["sentence_embedding"], feeds)
    return vectors

"""Compiled bundles: an export prepared for a target, verified, and stored with how it was made.

A bundle is a self-contained folder::

    model.onnx (+ model.onnx.data)     the graph after the target's preset
    specializations.json, custom_io.yaml   device files (qaic target; encoders: one seq_len each)
    config.json, tokenizer files, generation_config.json   copied from the export
    manifest.json                      source, target, backend, options, qgraph version,
                                       verification result, cache key

Bundles live in qgraph's cache (``$QGRAPH_CACHE/bundles/<key>``) under a key
made of the export's own content key, the target, every option, qgraph's
version and the digest of qgraph's and the passes' sources: the same request
returns the existing folder without running anything. A bundle is built in a
staging folder and published by a rename only after its check passed, so a
failed or interrupted compile leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qgraph.errors import BadInputError, PassFailure
from qgraph.export import cache

__all__ = [
    "BUNDLE_MANIFEST",
    "TARGETS",
    "CompileOptions",
    "CompiledBundle",
    "EncoderOptions",
    "PRECISIONS",
    "compile_decoder",
    "compile_encoder",
    "read_bundle",
]

BUNDLE_MANIFEST = "manifest.json"
TARGETS = ("qaic", "ort")
#: ``compile(precision=...)``: the weights of an ``ort`` bundle. fp32 is the ``ort`` preset,
#: int8 / int4 its ``ort-int8`` / ``ort-int4`` forms (weight-only MatMulNBits, round to nearest);
#: gguf runs ``ort-int4`` with the GGUF source's own Q4_0/Q4_1/Q8_0 blocks (``quantize.gguf``).
PRECISIONS = ("fp32", "int8", "int4", "gguf")
KV_DTYPES = ("float16", "float32", "mxint8", "model")
_LAYOUT = 1
_NOT_COPIED = {"model.onnx", "model.onnx.data", "export.json"}


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What a decoder bundle is compiled with (checked on creation: bad values never reach a pass)."""

    target: str = "qaic"
    prefill_seq_len: int = 32
    ctx_len: int = 128
    batch_size: int = 1
    kv_dtype: str = "float16"
    pass_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    verify_examples: int = 3
    full_batch_size: int | None = None  # continuous batching: cache rows (qaic target)
    comp_ctx_lengths: tuple[int, ...] = ()  # compute-context lengths (qaic target)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise BadInputError(f"unknown target {self.target!r}; qgraph compiles for: {', '.join(TARGETS)}")
        for name in ("prefill_seq_len", "ctx_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInputError(f"{name} must be a positive integer, got {value!r}")
        if self.ctx_len <= self.prefill_seq_len:
            raise BadInputError(f"ctx_len ({self.ctx_len}) must be larger than prefill_seq_len "
                                f"({self.prefill_seq_len}): the cache has to hold the prompt and the tokens after it")
        if self.full_batch_size is not None and (isinstance(self.full_batch_size, bool)
                                                 or not isinstance(self.full_batch_size, int)
                                                 or self.full_batch_size < 1):
            raise BadInputError(f"full_batch_size must be a positive integer, got {self.full_batch_size!r}")
        lengths = self.comp_ctx_lengths
        if not isinstance(lengths, tuple) or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.ctx_len
                                                 for n in lengths):
            raise BadInputError(f"comp_ctx_lengths must be integers in 1..ctx_len ({self.ctx_len}), got {lengths!r}")
        if (self.full_batch_size is not None or lengths) and self.target != "qaic":
            raise BadInputError("continuous batching and compute-context lengths are device (retained-state) "
                                f"features: compile with target='qaic', not {self.target!r}")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "fp32" and self.target != "ort":
            raise BadInputError(f"precision {self.precision} is for target ort (weight-only MatMulNBits, an "
                                f"onnxruntime op); target {self.target} compiles float weights: use precision fp32")
        if self.precision == "gguf" and not dict(self.pass_options.get("quantize", {})).get("gguf"):
            raise BadInputError("precision gguf keeps a GGUF file's blocks: compile a model loaded from a GGUF "
                                "file (or set quantize={'gguf': PATH})")
        if "quantize" in self.pass_options and self.precision == "fp32":
            raise BadInputError("quantize options need precision int8 or int4 (fp32 runs no quantize pass)")
        if self.kv_dtype not in KV_DTYPES:
            raise BadInputError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if not isinstance(self.verify_examples, int) or self.verify_examples < 0:
            raise BadInputError(f"verify_examples must be a non-negative integer, got {self.verify_examples!r}")
        for pass_name, options in self.pass_options.items():
            if not isinstance(options, Mapping):
                raise BadInputError(f"options of pass {pass_name!r} must be a mapping of option name to value, "
                                    f"got {options!r}")
            if pass_name == "kv-cache" and set(options) & {"ctx_len", "prefill_len", "batch_size", "kv_dtype",
                                                             "full_batch_size", "comp_ctx_lengths"}:
                raise BadInputError("set ctx_len, prefill_seq_len, batch_size, kv_dtype, full_batch_size and "
                                    "comp_ctx_lengths as compile arguments, not as kv-cache pass options")

    @property
    def preset(self) -> str:
        """The preset the bundle runs: the target's, at this precision."""
        if self.precision == "fp32":
            return self.target
        return f"{self.target}-{'int4' if self.precision == 'gguf' else self.precision}"

    def kv_options(self) -> dict[str, Any]:
        options = {"ctx_len": self.ctx_len, "prefill_len": self.prefill_seq_len, "batch_size": self.batch_size,
                   "kv_dtype": self.kv_dtype}
        if self.full_batch_size is not None:
            options["full_batch_size"] = self.full_batch_size
        if self.comp_ctx_lengths:
            options["comp_ctx_lengths"] = ",".join(map(str, self.comp_ctx_lengths))
        return options

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["pass_options"] = {k: dict(v) for k, v in sorted(self.pass_options.items())}
        return data


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """What an encoder bundle is compiled with: the sequence lengths it is specialized for."""

    seq_lens: tuple[int, ...] = (32,)
    verify_examples: int = 3

    def __post_init__(self) -> None:
        if not self.seq_lens:
            raise BadInputError("seq_len needs at least one length")
        for value in self.seq_lens:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInputError(f"seq_len must be positive integers, got {value!r}")
        if not isinstance(self.verify_examples, int) or self.verify_examples < 0:
            raise BadInputError(f"verify_examples must be a non-negative integer, got {self.verify_examples!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"seq_lens": sorted(set(self.seq_lens)), "verify_examples": self.verify_examples}


@dataclasses.dataclass(frozen=True)
class CompiledBundle:
    path: Path
    manifest: dict[str, Any]
    from_cache: bool  #: the bundle existed; nothing ran


@functools.cache
def _code_digest() -> str:
    """Sources of qgraph and its passes: editing either makes new bundles."""
    import qgraph_passes

    sha = hashlib.sha256()
    for base in (Path(__file__).parent, Path(qgraph_passes.__file__).parent):
        for source in sorted(base.rglob("*.py")):
            sha.update(str(source.relative_to(base)).encode() + b"\0" + source.read_bytes() + b"\0")
    return sha.hexdigest()


def _version() -> str:
    import qgraph

    return qgraph.__version__


def read_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a bundle folder; BadInputError when ``path`` is not one."""
    folder = Path(path)
    manifest_path = folder / BUNDLE_MANIFEST
    if not manifest_path.is_file() or not (folder / "model.onnx").is_file():
        raise BadInputError(f"{folder}: not a qgraph bundle (no {BUNDLE_MANIFEST} and model.onnx); "
                            "make one with qgraph compile or AutoModelForCausalLM.compile")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BadInputError(f"{manifest_path}: cannot read it ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("qgraph_bundle") != _LAYOUT:
        raise BadInputError(f"{manifest_path}: not a qgraph bundle manifest of layout {_LAYOUT}")
    return manifest


def _existing(entry: Path, key: str) -> dict[str, Any] | None:
    try:
        manifest = read_bundle(entry)
    except BadInputError:
        return None
    return manifest if manifest.get("key") == key else None


def _copy_side_files(export_dir: Path, folder: Path) -> None:
    for item in export_dir.iterdir():  # tokenizer, config, generation config
        if item.is_file() and item.name not in _NOT_COPIED:
            shutil.copy2(item, folder / item.name)


def _build_once(kind: str, export_dir: Path, options: dict[str, Any], root: Path | None,
                build: Any) -> CompiledBundle:
    """Look up the key of (export, kind, options); otherwise ``build(staging) -> manifest`` and publish."""
    from qgraph.export.frontend import read_manifest

    export_manifest = read_manifest(export_dir)
    root = cache.cache_root(root)
    key = cache.key_of({"layout": _LAYOUT, "kind": kind, "export": export_manifest.get("key"), "options": options,
                        "qgraph": _version(), "code": _code_digest()})
    entry = cache.entry_path(root, "bundles", key)
    found = _existing(entry, key)
    if found is not None:
        return CompiledBundle(entry, found, True)
    with cache.locked(root, "bundles", key):
        found = _existing(entry, key)
        if found is not None:
            return CompiledBundle(entry, found, True)
        staging = cache.staging_folder(root, "bundles")
        try:
            started = time.perf_counter()
            manifest = build(staging)
            manifest.update({
                "qgraph_bundle": _LAYOUT, "key": key, "kind": kind, "qgraph_version": _version(),
                "source": export_manifest.get("source"), "export": {
                    "key": export_manifest.get("key"), "exporter": export_manifest.get("exporter"),
                    "task": export_manifest.get("task"), "model_type": export_manifest.get("model_type"),
                    "folder": os.fspath(export_dir)},
                "options": options, "compile_seconds": round(time.perf_counter() - started, 3),
                "files": sorted(p.name for p in staging.iterdir()) + [BUNDLE_MANIFEST],
            })
            (staging / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n",
                                                   encoding="utf-8")
            cache.publish(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return CompiledBundle(entry, manifest, False)


def compile_decoder(export_dir: str | os.PathLike[str], options: CompileOptions, *,
                    root: str | os.PathLike[str] | None = None, threads: int = 2,
                    backend: str | None = None) -> CompiledBundle:
    """The target's preset on a causal-LM export, checked by sequence replay, as a bundle."""
    from qgraph.runtime.backend import DEFAULT_BACKEND, get_backend

    from qgraph.export.progress import Progress

    runtime = get_backend(backend or DEFAULT_BACKEND, target=options.target)
    export_dir = Path(export_dir)
    progress = Progress()

    def build(staging: Path) -> dict[str, Any]:
        from qgraph import io
        from qgraph.manager import PassManager
        from qgraph.pipeline import Pipeline
        from qgraph.registry import default_registry
        from qgraph.verify.sequence import check_sequence_equivalence

        registry = default_registry()
        pipeline = Pipeline.from_preset(options.preset, registry)
        pipeline.set_options({"kv-cache": options.kv_options(), **{k: dict(v) for k, v in options.pass_options.items()}})
        with progress.step(f"running preset {options.preset} and saving the result"):
            model = io.load(export_dir / "model.onnx")
            report = PassManager(pipeline, registry=registry).run(model)
            io.save(model, staging / "model.onnx", external_data=True, protect=[export_dir / "model.onnx"])
        reference, budget = export_dir / "model.onnx", None
        if options.precision != "fp32":  # replay against the export with the same quantized weights
            reference, budget = _quantized_reference(export_dir, pipeline, staging, progress)
        if options.target == "ort":  # the concat graph's shapes are dynamic; still say what it was made for
            _write_json(staging / "specializations.json", {"specializations": [
                {"name": "Prefill", "symbols": _symbols(options.batch_size, options.prefill_seq_len, options.ctx_len)},
                {"name": "Decode", "symbols": _symbols(options.batch_size, 1, options.ctx_len)}]})
        _copy_side_files(export_dir, staging)
        verification: dict[str, Any] = {"method": "sequence replay against the no-cache export",
                                        "examples": options.verify_examples}
        if options.verify_examples:
            started = time.perf_counter()
            with progress.step(f"replaying {options.verify_examples} sequences against the export"):
                verdict = check_sequence_equivalence(staging / "model.onnx", reference,
                                                     examples=options.verify_examples, threads=threads,
                                                     cached_label=f"the {options.target} bundle",
                                                     reference_label="the export" if budget is None
                                                     else "the export, quantized alike")
            if not verdict.equivalent:
                raise PassFailure(f"the {options.target} preset changed the model's meaning; no bundle written:\n"
                                  f"{verdict}")
            verification.update(result="equivalent", headline=verdict.headline(),
                                seconds=round(time.perf_counter() - started, 3))
            if options.full_batch_size is not None:
                verification["slots"] = _check_slots(staging / "model.onnx", export_dir / "model.onnx", options,
                                                     threads, progress)
        else:
            verification["result"] = "not checked"
        if budget is not None:
            verification["quantization_budget"] = budget
            shutil.rmtree(reference.parent, ignore_errors=True)
        return {"target": options.target, "preset": options.preset, "backend": runtime.name,
                "verification": verification,
                "passes": [{"name": r.name, "seconds": round(r.seconds, 4), "changed": r.changed}
                           for r in report.passes],
                "nodes": {"before": report.nodes_before, "after": report.nodes_after}}

    return _build_once("causal-lm", export_dir, options.to_dict(), root, build)


def _quantized_reference(export_dir: Path, pipeline: Any, staging: Path, progress: Any) -> tuple[Path, dict[str, Any]]:
    """The no-cache export through the preset's own ``quantize`` step, and how far that moved it.

    A quantized bundle cannot equal the float export; it must equal the
    export with the same weights. The quantize pass is deterministic, so the
    export quantized alike is the replay's reference, and the lossy step
    itself is held to its budget (``QuantizePass.verification_budget``).
    """
    from qgraph import io
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline
    from qgraph.registry import default_registry
    from qgraph.verify.budget import check_budget

    (step,) = [s for s in pipeline.pass_steps() if s.name == "quantize"]
    registry = default_registry()
    folder = staging / ".quantized-export"
    folder.mkdir()
    with progress.step("quantizing the export alike (the replay's reference)"):
        model = io.load(export_dir / "model.onnx")
        PassManager(Pipeline([{"pass": "quantize", "options": dict(step.options)}]), registry=registry).run(model)
        io.save(model, folder / "model.onnx", external_data=True, protect=[export_dir / "model.onnx"])
    budget = registry.create("quantize", step.options).verification_budget()
    with progress.step(f"checking the quantization budget ({budget.describe()})"):
        result = check_budget(export_dir / "model.onnx", folder / "model.onnx", budget)
    if not result.within:
        raise PassFailure(f"quantization left its budget; no bundle written: {result}")
    summary = {"budget": budget.describe(), "agreement": result.agreement,
               "perplexity_before": result.perplexity_before, "perplexity_after": result.perplexity_after}
    return folder / "model.onnx", summary


def compile_encoder(export_dir: str | os.PathLike[str], options: EncoderOptions, *,
                    root: str | os.PathLike[str] | None = None, threads: int = 2,
                    backend: str | None = None) -> CompiledBundle:
    """The cleanup preset on an encoder export, checked on drawn inputs, with one specialization per seq_len."""
    from qgraph.runtime.backend import DEFAULT_BACKEND, get_backend

    runtime = get_backend(backend or DEFAULT_BACKEND, target="embedding")
    export_dir = Path(export_dir)

    def build(staging: Path) -> dict[str, Any]:
        from qgraph import io
        from qgraph.manager import PassManager
        from qgraph.pipeline import Pipeline
        from qgraph.registry import default_registry
        from qgraph.verify.equivalence import check_equivalent

        registry = default_registry()
        model = io.load(export_dir / "model.onnx")
        report = PassManager(Pipeline.from_preset("cleanup", registry), registry=registry).run(model)
        io.save(model, staging / "model.onnx", external_data=True, protect=[export_dir / "model.onnx"])
        lengths = sorted(set(options.seq_lens))
        _write_json(staging / "specializations.json",
                    {"specializations": [{"name": "Embedding" if len(lengths) == 1 else f"Embedding_{i}",
                                          "symbols": {"seq_len": str(n)}} for i, n in enumerate(lengths)]})
        _copy_side_files(export_dir, staging)
        verification: dict[str, Any] = {"method": "outputs on drawn inputs against the export",
                                        "examples": options.verify_examples}
        if options.verify_examples:
            verdict = check_equivalent(export_dir / "model.onnx", staging / "model.onnx",
                                       examples=options.verify_examples, threads=threads, save_artifacts=False)
            if not verdict.equivalent:
                raise PassFailure(f"the cleanup preset changed the encoder's meaning; no bundle written:\n{verdict}")
            verification["result"] = "equivalent"
        else:
            verification["result"] = "not checked"
        return {"target": "embedding", "backend": runtime.name, "verification": verification,
                "passes": [{"name": r.name, "seconds": round(r.seconds, 4), "changed": r.changed}
                           for r in report.passes],
                "nodes": {"before": report.nodes_before, "after": report.nodes_after}}

    return _build_once("embedding", export_dir, options.to_dict(), root, build)


def _check_slots(cached: Path, reference: Path, options: CompileOptions, threads: int, progress: Any) -> str:
    """Requests interleaved in the bundle's cache rows each give their logits alone (qgraph.verify.slots)."""
    from qgraph.verify.sequence import SequenceReplayer
    from qgraph.verify.slots import check_slots

    with progress.step(f"serving {options.verify_examples} request streams through {options.full_batch_size} "
                       "cache rows"), SequenceReplayer(cached, reference, threads=threads) as replayer:
        failure = check_slots(replayer, examples=options.verify_examples, slots=options.full_batch_size)
    if failure is not None:
        raise PassFailure(f"continuous batching does not give each request its own logits; no bundle written:\n"
                          f"{failure}")
    return "equivalent: interleaved requests give each request's logits alone"


def _symbols(batch: int, seq: int, ctx: int) -> dict[str, str]:
    return {"batch_size": str(batch), "seq_len": str(seq), "ctx_len": str(ctx)}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

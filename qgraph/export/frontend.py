"""``export_model``: MODEL -> a folder with model.onnx, its tokenizer and a manifest.

The output folder holds

    model.onnx (+ model.onnx.data)  the graph: input_ids, attention_mask -> logits | sentence_embedding
    config.json, generation_config.json, tokenizer files   from the Hugging Face model
    export.json                     the manifest: source, task, wrapper, exporter, opset, interface,
                                    node count, files, timings, library versions, cache key

Order of work, chosen so that bad input costs nothing and a repeat costs
almost nothing:

1. options, MODEL and the output folder are checked (no torch import, no
   write): bad input stops here with a :class:`~qgraph.errors.BadInputError`;
2. the cache key is computed from file digests (remembered by stat), the
   options, library versions and the export code's digest;
3. an output folder already holding this key is left as it is; an entry in
   the cache is copied to the output folder;
4. otherwise the model is loaded, wrapped, exported, checked against torch
   in onnxruntime, written into a staging folder inside the cache and
   published under its key -- then copied out.

The output folder is replaced as a whole (staging folder beside it, then
renames), and only if it is empty or an earlier qgraph export: a folder
holding anything else is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgraph.errors import BadInputError
from qgraph.export import cache
from qgraph.export.exporters import (
    TRACE_BATCH,
    TRACE_SEQ,
    ExportFailure,
    check_opset,
    compare_with_torch,
    export_to_file,
)
from qgraph.export.interface import INPUT_NAMES, POOLINGS, WRAPPERS, output_name
from qgraph.export.progress import Progress
from qgraph.export.sources import TASKS, Source, check_supported, load, resolve

__all__ = ["ATTN_IMPLEMENTATIONS", "MANIFEST", "WRAPPERS", "ExportResult", "export_model", "read_manifest"]

#: The manifest's file name in an export folder.
MANIFEST = "export.json"
#: Attention implementations a model can be traced with (transformers' names).
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
#: Bumped when the folder layout or manifest changes meaning.
_LAYOUT = 1
#: (batch, seq, padding) of the check every export passes before it is published.
_CHECK_CASES = ((2, 7, 2), (1, 1, 0))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` produced."""

    output_dir: Path
    manifest: dict[str, Any]
    from_cache: bool      #: the graph was not exported by this call
    up_to_date: bool      #: the output folder already held this export; nothing was written
    seconds: float        #: wall time of this call

    @property
    def model_path(self) -> Path:
        return self.output_dir / "model.onnx"


def export_model(
    model: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
    task: str = "auto",
    wrapper: str = "qgraph",
    pooling: str | None = None,
    normalize: bool | None = None,
    attn_implementation: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export MODEL (HF folder, GGUF file or packaged name) to ``output_dir``.

    ``task``: "auto" (from the config), "causal-lm" or "embedding".
    ``wrapper`` (causal LMs; encoders ignore it): the module traced around the
    model. "qgraph" passes ``position_ids = cumsum(attention_mask) - 1``, so a
    left-padded row gets the logits of the same row unpadded; "plain" calls
    the model with only ``input_ids`` and ``attention_mask`` (``use_cache=False``),
    which is what a user's plain ``torch.onnx.export(model, (input_ids,
    attention_mask))`` traces: the model counts positions itself, and the
    export is checked against that meaning.
    ``pooling`` (embedding only): "mean", "cls" or "max"; default: what a
    sentence-transformers folder declares, else mean. ``normalize``: L2-normalize
    the embedding; default: whether the folder declares a Normalize module.
    ``attn_implementation``: "auto" (transformers' default for the
    architecture: sdpa where supported, else eager), "sdpa" or "eager".
    ``force``: export again even if the cache holds the result (and replace it).

    Raises:
        BadInputError: MODEL, an option or the output folder is unusable
            (nothing is written).
        ExportFailure: the exporter failed or its graph disagrees with torch.
    """
    started = time.perf_counter()
    progress = progress or Progress(enabled=False)
    opset = check_opset(exporter, opset)
    _check_choice("--task", task, ("auto", *TASKS))
    _check_choice("--wrapper", wrapper, WRAPPERS)
    _check_choice("--attn-implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    if pooling is not None:
        _check_choice("--pooling", pooling, POOLINGS)
    source = resolve(model)
    out = Path(output_dir).expanduser().absolute()
    _check_output_dir(out, source)
    root = cache.cache_root(cache_dir)

    request = {
        "exporter": exporter, "opset": opset, "task": task, "wrapper": wrapper, "pooling": pooling,
        "normalize": normalize, "attn_implementation": attn_implementation,
    }
    memos: list[tuple[Path, str]] = []  # digest memos, written only once the request proved good
    key = cache.key_of({
        "layout": _LAYOUT, "source": source.identity(root, memos), "request": request,
        "versions": cache.library_versions(), "code": cache.code_digest(),
    })
    existing = _complete_manifest(out, key)
    if existing is not None and not force:
        cache.remember(memos)
        progress.note(f"{out} already holds this export (cache key {key}); nothing to do")
        return ExportResult(out, existing, True, True, time.perf_counter() - started)

    entry = cache.entry_path(root, "exports", key)
    manifest = None if force else _complete_manifest(entry, key)
    from_cache = manifest is not None
    if manifest is None:
        check_supported(source)
        wait_note = "waiting for another qgraph process exporting the same model"
        with cache.locked(root, "exports", key, on_wait=lambda: progress.note(wait_note)):
            manifest = None if force else _complete_manifest(entry, key)
            from_cache = manifest is not None
            if manifest is None:
                staging = cache.staging_folder(root, "exports")
                try:
                    manifest = _build(source, staging, key, request, root, progress)
                    cache.publish(staging, entry)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    else:
        progress.note(f"reusing the cached export {entry}")
    cache.remember(memos)
    # The entry may have been made from the same bytes at another path: the
    # output's manifest names the source of this request.
    manifest = dict(manifest, source=_source_record(source))
    with progress.step(f"writing {out}"):
        _install(entry, out, manifest)
    return ExportResult(out, manifest, from_cache, False, time.perf_counter() - started)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an export folder (BadInputError if it is not one)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BadInputError(f"{folder}: not a qgraph export folder (cannot read {MANIFEST}: {error})") from None
    if not isinstance(manifest, dict) or "key" not in manifest:
        raise BadInputError(f"{folder}: {MANIFEST} is not a qgraph export manifest")
    return manifest


# ------------------------------------------------------------------ checks


def _check_choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise BadInputError(f"{flag} {value!r}: choose from {', '.join(allowed)}")


def _check_output_dir(out: Path, source: Source) -> None:
    """The output folder may be new, empty, or an earlier export; never the model's own folder."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out}: exists and is not a folder")
    model_home = source.path if source.kind == "folder" else source.path.parent
    real_out, real_model = Path(os.path.realpath(out)), Path(os.path.realpath(model_home))
    if real_out == real_model or real_model.is_relative_to(real_out) or (
        source.kind == "folder" and real_out.is_relative_to(real_model)
    ):
        raise BadInputError(f"-o {out}: overlaps the model's own folder {model_home}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BadInputError(
            f"-o {out}: the folder is not empty and holds no qgraph export ({MANIFEST}); "
            "qgraph only replaces its own exports -- choose an empty or new folder"
        )


def _complete_manifest(folder: Path, key: str) -> dict[str, Any] | None:
    """The manifest of ``folder`` if it is a complete export with ``key`` (every file present, right size)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None
    for name, size in manifest.get("files", {}).items():
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return manifest


# ------------------------------------------------------------------- build


def _build(source: Source, folder: Path, key: str, request: dict[str, Any], root: Path, progress: Progress) -> dict[str, Any]:
    import torch

    from qgraph import io
    from qgraph.export.wrappers import wrap

    exporter, opset = request["exporter"], request["opset"]
    loaded = load(source, task=request["task"], attn_implementation=request["attn_implementation"], root=root,
                  progress=progress, checked=True)
    task = loaded.task
    pooling = normalize = wrapper = None
    if task == "causal-lm":
        wrapper = request["wrapper"]
    else:
        pooling = request["pooling"] or loaded.pooling_default
        normalize = loaded.normalize_default if request["normalize"] is None else request["normalize"]
    module = wrap(loaded.model, task, wrapper=wrapper or "qgraph", pooling=pooling or "mean", normalize=bool(normalize))
    vocab_size = _vocab_size(loaded)
    # Nothing path-dependent goes into the graph: the cached bytes are a
    # function of the key (the manifest beside the graph names the source).
    metadata = {"qgraph.export.task": task, "qgraph.export.exporter": exporter,
                "qgraph.export.model_type": str(loaded.config.model_type)}
    if wrapper is not None:
        metadata["qgraph.export.wrapper"] = wrapper
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with progress.step(f"exporting with the {exporter} exporter (opset {opset})") as export_time:
            model = export_to_file(module, folder / "model.onnx", exporter=exporter, opset=opset, task=task,
                                   vocab_size=vocab_size, metadata=metadata)
        nodes = len(model.graph)
        weight_bytes = io.initializer_bytes(model)
        del model
        # Against the very module traced: in plain mode the model's own positions are the meaning.
        with progress.step("checking the graph against torch in onnxruntime") as check_time:
            try:
                comparisons = compare_with_torch(module, folder / "model.onnx", task, vocab_size, _CHECK_CASES)
            except ExportFailure as failure:
                other = "dynamo" if exporter == "torchscript" else "torchscript"
                raise ExportFailure(f"the {exporter} export of {source.spec}: {failure} (a tracing error of "
                                    f"the exporter: --exporter {other} may export it)") from None
    bad = [c for c in comparisons if not c.ok]
    if bad:
        raise ExportFailure(
            f"the {exporter} export of {source.spec} disagrees with torch: " + "; ".join(map(str, bad))
        )
    with progress.step("saving config and tokenizer") as side_time:
        loaded.model.config.save_pretrained(folder)
        if task == "causal-lm" and getattr(loaded.model, "generation_config", None) is not None:
            loaded.model.generation_config.save_pretrained(folder)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(folder)
    for note in loaded.notes:
        progress.note(note)

    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*")) if path.is_file()
    }
    manifest = {
        "qgraph_export": _LAYOUT,
        "key": key,
        "source": _source_record(source),
        "task": task,
        "wrapper": wrapper,
        "architecture": type(loaded.model).__name__,
        "model_type": loaded.config.model_type,
        "exporter": exporter,
        "opset": opset,
        "attn_implementation": getattr(loaded.model.config, "_attn_implementation", None) or request["attn_implementation"],
        "pooling": pooling,
        "normalize": normalize,
        "inputs": {name: {"dtype": "int64", "shape": ["batch", "seq"]} for name in INPUT_NAMES},
        "outputs": {output_name(task): {"dtype": "float32",
                                        "shape": ["batch", "seq", vocab_size] if task == "causal-lm"
                                        else ["batch", int(loaded.config.hidden_size)]}},
        "trace_shape": [TRACE_BATCH, TRACE_SEQ],
        "nodes": nodes,
        "weight_bytes": weight_bytes,
        "tokenizer": loaded.tokenizer is not None,
        "check": [str(c) for c in comparisons],
        "seconds": {"export": round(export_time.seconds, 2), "check": round(check_time.seconds, 2),
                    "side_files": round(side_time.seconds, 2)},
        "versions": cache.library_versions(),
        "files": files,
    }
    # Written last: an entry with a manifest whose files all exist is complete.
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _source_record(source: Source) -> dict[str, Any]:
    return {
        "model": source.spec, "kind": source.kind, "path": str(source.path),
        "package": f"{source.package.distribution}=={source.package_version}" if source.package else None,
    }


def _vocab_size(loaded: Any) -> int:
    vocab = getattr(loaded.config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    embeddings = loaded.model.get_input_embeddings()
    return int(embeddings.num_embeddings)


# ----------------------------------------------------------------- install


def _install(entry: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Copy a cache entry to ``out`` with ``manifest``, replacing an earlier export there as a whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.make_temp_folder(out.parent, f".{out.name}.tmp-")
    old = None
    try:
        # Copies, not hard links: onnx_ir refuses to map a data file with
        # several links, and a user editing the output must not edit the cache.
        shutil.copytree(entry, staging, dirs_exist_ok=True)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(staging, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Where a runnable model lives, and the onnxruntime session that runs it fast.

A model folder is what ``qgraph export`` writes (``model.onnx`` [+ ``.data``],
the tokenizer files, ``config.json``, ``generation_config.json``,
``export.json``) or what a KV-cache pipeline writes beside its output
(``specializations.json``). :class:`ModelFolder` finds each piece and names
the missing file when one is needed and absent (exit 2).

Sessions here are for speed, unlike verification's (which turns
onnxruntime's optimizations off to see the graph as written): all graph
optimizations on, two intra-op threads (the target machines have two cores),
sequential execution.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from qgraph.errors import BadInputError
from qgraph.runtime.light_tokenizer import LightTokenizer, read_json_object
from qgraph.specializations import parse_specializations

__all__ = ["DEFAULT_THREADS", "ModelFolder", "open_session"]

DEFAULT_THREADS = 2
MODEL_FILE = "model.onnx"
SPECIALIZATIONS_FILE = "specializations.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A model file and the folder(s) its tokenizer and side files come from."""

    model_path: Path
    folder: Path
    tokenizer_folder: Path

    @classmethod
    def find(cls, spec: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None) -> ModelFolder:
        """``spec`` is a folder holding ``model.onnx`` or an ``.onnx`` file; ``tokenizer`` overrides its folder."""
        path = Path(spec)
        if path.is_dir():
            model = path / MODEL_FILE
            if not model.is_file():
                onnx_files = sorted(p.name for p in path.glob("*.onnx"))
                hint = f" (it has {', '.join(onnx_files)}: give the file itself)" if onnx_files else ""
                raise BadInputError(f"{model}: no such file; {path} is not a model folder{hint}")
        elif path.is_file():
            model = path
        else:
            raise BadInputError(f"{path}: no such file or folder (give an export folder or an .onnx file)")
        tok = Path(tokenizer) if tokenizer is not None else model.parent
        if tokenizer is not None and not tok.is_dir():
            raise BadInputError(f"--tokenizer {tok}: no such folder")
        return cls(model_path=model, folder=model.parent, tokenizer_folder=tok)

    # -- side files ---------------------------------------------------------------

    def _json(self, name: str, folder: Path | None = None) -> dict[str, Any] | None:
        return read_json_object((folder or self.folder) / name)

    def config(self) -> dict[str, Any] | None:
        """``config.json`` beside the model, else beside the tokenizer."""
        return self._json("config.json") or self._json("config.json", self.tokenizer_folder)

    def manifest(self) -> dict[str, Any] | None:
        return self._json("export.json")

    def specializations(self) -> list[dict[str, int]]:
        """The symbols of each shape in ``specializations.json``, values as ints; [] if absent.

        Both of QEfficient's forms are read: the current named one
        (``{"name": "Prefill", "symbols": {...}}``) and the older flat list.
        """
        return [symbols for _, symbols in self.named_specializations()]

    def named_specializations(self) -> list[tuple[str | None, dict[str, int]]]:
        """(graph name, or None in the flat form; symbols as ints) of each shape."""
        data = self._json(SPECIALIZATIONS_FILE)
        if data is None:
            return []
        return parse_specializations(data, str(self.folder / SPECIALIZATIONS_FILE))

    def eos_token_ids(self, tokenizer: Any = None) -> set[int]:
        """End-of-sequence ids: ``generation_config.json`` first, then the config, then the tokenizer."""
        for source in (self._json("generation_config.json") or self._json("generation_config.json",
                                                                           self.tokenizer_folder),
                       self.config()):
            if source and source.get("eos_token_id") is not None:
                value = source["eos_token_id"]
                return {int(v) for v in (value if isinstance(value, list) else [value])}
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            return {int(tokenizer.eos_token_id)}
        return set()

    def tokenizer(self) -> Any:
        """The folder's tokenizer: :class:`LightTokenizer` where ``tokenizer.json`` exists, else AutoTokenizer.

        ``tokenizer.json`` is read with the ``tokenizers`` library alone (same
        ids, text and chat prompts as transformers gives), so generating does
        not import transformers and, through it, torch (~300 MiB of resident
        memory). Folders with only sentencepiece or vocabulary files still go
        through transformers' AutoTokenizer.
        """
        folder = self.tokenizer_folder
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise BadInputError(
                f"{folder / 'tokenizer.json'}: no such file; {folder} has no tokenizer "
                "(give a qgraph export folder, or --tokenizer DIR)"
            )
        if (folder / "tokenizer.json").is_file():
            return LightTokenizer.from_folder(folder)
        try:
            from transformers import AutoTokenizer
        except ImportError as error:  # pragma: no cover - the export extra is missing
            raise BadInputError(f"reading the tokenizer needs transformers (pip install 'qgraph[export]'): {error}")
        try:
            return AutoTokenizer.from_pretrained(os.fspath(folder))
        except Exception as error:  # noqa: BLE001 - transformers raises many kinds for broken folders
            raise BadInputError(f"{folder}: cannot load its tokenizer: {error}") from None


def session_options(threads: int = DEFAULT_THREADS) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def open_session(model: str | os.PathLike[str] | bytes, *, threads: int = DEFAULT_THREADS,
                 label: str | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model path (external data found beside it) or serialized bytes."""
    shown = label or (os.fspath(model) if not isinstance(model, bytes) else "the model")
    try:
        source = model if isinstance(model, bytes) else os.fspath(model)
        return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(f"{shown}: onnxruntime cannot load it: {message}") from None

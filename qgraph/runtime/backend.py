"""Where a compiled bundle runs: one interface, one implementation per runtime.

A *target* says what the graph was prepared for (``ort``: canonical ops and a
concat-style cache; ``qaic``: Cloud AI 100's retained-state contract); a
*backend* says what executes it. Both are recorded in a bundle's manifest.

Today there is one backend, ``onnxruntime-cpu``: it runs the graphs of both
targets (the qaic target's custom ops carry ONNX function bodies, so
onnxruntime can execute them on the CPU). There is no Cloud AI 100 runtime on
these machines and no pretend one: asking for a backend that is not
registered is a :class:`~qgraph.errors.BadInputError` naming the ones there are.
"""

from __future__ import annotations

import os
from typing import Any

from qgraph.errors import BadInputError

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "OnnxRuntimeCPU", "get_backend"]

DEFAULT_BACKEND = "onnxruntime-cpu"


class Backend:
    """Loads a bundle's graph for generation (decoders) or embedding (encoders)."""

    name = "backend"
    targets: tuple[str, ...] = ()  #: targets whose graphs this backend can run

    def load_generator(self, folder: str | os.PathLike[str], *, ctx_len: int | None = None,
                       threads: int | None = None) -> Any:
        """A :class:`~qgraph.runtime.generate.Generator` holding at most ``ctx_len`` tokens a row."""
        raise NotImplementedError

    def load_embedder(self, folder: str | os.PathLike[str], *, threads: int | None = None) -> Any:
        """An :class:`~qgraph.runtime.embed.EmbeddingModel`."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class OnnxRuntimeCPU(Backend):
    """onnxruntime's CPU execution provider: every target qgraph writes runs here."""

    name = DEFAULT_BACKEND
    targets = ("ort", "qaic", "embedding")

    def load_generator(self, folder: str | os.PathLike[str], *, ctx_len: int | None = None,
                       threads: int | None = None) -> Any:
        from qgraph.runtime.generate import load_generator
        from qgraph.runtime.session import DEFAULT_THREADS

        generator = load_generator(folder, threads=threads or DEFAULT_THREADS)
        engine = generator.engine
        if ctx_len is not None and (engine.max_tokens is None or engine.max_tokens > ctx_len):
            # A concat cache grows without bound; the bundle's ctx_len still caps what a row holds.
            engine.max_tokens = ctx_len
        return generator

    def load_embedder(self, folder: str | os.PathLike[str], *, threads: int | None = None) -> Any:
        from qgraph.runtime.embed import EmbeddingModel
        from qgraph.runtime.session import DEFAULT_THREADS

        return EmbeddingModel.load(folder, threads=threads or DEFAULT_THREADS)

    def describe(self) -> str:
        import onnxruntime

        return f"{self.name} (onnxruntime {onnxruntime.__version__}, CPUExecutionProvider)"


BACKENDS: dict[str, Backend] = {DEFAULT_BACKEND: OnnxRuntimeCPU()}


def get_backend(name: str = DEFAULT_BACKEND, *, target: str | None = None) -> Backend:
    """The backend called ``name``; it must be able to run ``target``'s graphs."""
    backend = BACKENDS.get(name)
    if backend is None:
        raise BadInputError(f"no runtime backend named {name!r} on this machine (there is: "
                            f"{', '.join(sorted(BACKENDS))}); qgraph has no Cloud AI 100 device runtime")
    if target is not None and target not in backend.targets:
        raise BadInputError(f"backend {name!r} cannot run graphs made for target {target!r} "
                            f"(it runs: {', '.join(backend.targets)})")
    return backend

"""Running exported and rewritten graphs in onnxruntime: generation and embeddings.

    from qgraph.runtime import load_generator
    gen = load_generator("out/smollm2-qaic")          # folder or model.onnx
    result = gen.generate(["The capital of France is"], max_new_tokens=32)
    print(result.texts[0]); print(result.stats.format())

Modules: :mod:`~qgraph.runtime.session` (finding the model, tokenizer and
specializations in a folder; onnxruntime sessions), :mod:`~qgraph.runtime.engines`
(one step of a graph: no-cache, concat-style or retained-state KV cache, the
cache kept in onnxruntime OrtValues between steps), :mod:`~qgraph.runtime.generate`
(the token loop: prefill, greedy or sampled decode, EOS, streaming),
:mod:`~qgraph.runtime.stats` (TTFT, prefill and decode tokens/s, end-to-end)
and :mod:`~qgraph.runtime.embed` (pooled sentence embeddings).

Attributes are imported on first use so that ``import qgraph.runtime`` stays
cheap for the CLI.
"""

from __future__ import annotations

from qgraph.lazy_exports import lazy_attributes

__all__ = [
    "EmbeddingModel",
    "GenerationResult",
    "Generator",
    "LatencyStats",
    "ModelFolder",
    "SamplingConfig",
    "load_generator",
]

_HOMES = {
    "EmbeddingModel": "embed",
    "GenerationResult": "generate",
    "Generator": "generate",
    "SamplingConfig": "generate",
    "load_generator": "generate",
    "LatencyStats": "stats",
    "ModelFolder": "session",
}


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES, globals())

"""Export frontends: Hugging Face models (folders, GGUF, packaged names) to ONNX, and the tiny zoo.

    from qgraph.export import export_model
    result = export_model("smollm2-135m", "out/smollm2", exporter="dynamo")
    result.model_path       # out/smollm2/model.onnx: input_ids, attention_mask -> logits

Modules: :mod:`~qgraph.export.sources` (MODEL -> loaded model + tokenizer,
GGUF dequantized once into the cache), :mod:`~qgraph.export.wrappers` (the
traced modules: logits without cache, pooled embeddings),
:mod:`~qgraph.export.exporters` (TorchScript and dynamo, dynamic batch and
sequence, the check against torch), :mod:`~qgraph.export.cache` (content-
addressed cache), :mod:`~qgraph.export.frontend` (:func:`export_model`),
:mod:`~qgraph.export.zoo` (tiny random-weight models for tests) and
:mod:`~qgraph.export.command` (``qgraph export``).

Attributes are imported on first use, so ``import qgraph.export.command``
(what the CLI does at start-up) stays cheap; torch and transformers are only
imported when a model is actually loaded.
"""

from __future__ import annotations

from qgraph.lazy_exports import lazy_attributes

__all__ = [
    "EXPORTERS",
    "PACKAGED_MODELS",
    "TINY_ARCHS",
    "ExportFailure",
    "ExportResult",
    "Progress",
    "compare_with_torch",
    "export_model",
    "export_tiny",
    "read_manifest",
    "resolve",
]

_HOMES = {
    "EXPORTERS": "exporters",
    "ExportFailure": "exporters",
    "compare_with_torch": "exporters",
    "PACKAGED_MODELS": "sources",
    "resolve": "sources",
    "ExportResult": "frontend",
    "export_model": "frontend",
    "read_manifest": "frontend",
    "Progress": "progress",
    "TINY_ARCHS": "zoo",
    "export_tiny": "zoo",
}


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES, globals())

"""Sentence embeddings from an encoder export (``input_ids``, ``attention_mask`` -> ``sentence_embedding``).

The pooling (and normalization, when the model declares it) is inside the
exported graph, so the runtime only tokenizes, pads the batch on the right
and runs it; the vectors are what the torch model computes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from qgraph.errors import BadInputError
from qgraph.runtime.session import DEFAULT_THREADS, ModelFolder, open_session

__all__ = ["EMBEDDING_OUTPUT", "EmbeddingModel", "cosine_similarity"]

EMBEDDING_OUTPUT = "sentence_embedding"
_FED = ("input_ids", "attention_mask", "token_type_ids")


class EmbeddingModel:
    """An encoder graph with its tokenizer."""

    def __init__(self, session: ort.InferenceSession, tokenizer: Any, *, label: str) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.label = label
        inputs = {i.name for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if EMBEDDING_OUTPUT not in outputs:
            raise BadInputError(f"{label} has no '{EMBEDDING_OUTPUT}' output (its outputs: {outputs}); "
                                "export the encoder with qgraph export --task embedding")
        missing = sorted({"input_ids", "attention_mask"} - inputs)
        unknown = sorted(inputs - set(_FED))
        if missing or unknown:
            raise BadInputError(f"{label}: an embedding graph takes input_ids, attention_mask [, token_type_ids]; "
                                f"missing {missing}, unexpected {unknown}")
        self._inputs = inputs
        self.pad_token_id = 0  # masked out; any row of the embedding table does

    @classmethod
    def load(cls, spec: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None,
             threads: int = DEFAULT_THREADS) -> EmbeddingModel:
        folder = ModelFolder.find(spec, tokenizer=tokenizer)
        tok = folder.tokenizer()
        return cls(open_session(folder.model_path, threads=threads), tok, label=os.fspath(folder.model_path))

    def batch(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids and mask of ``texts``, padded on the right."""
        ids = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        width = max(len(i) for i in ids)
        input_ids = np.full((len(ids), width), self.pad_token_id, np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return feeds

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings [len(texts), dim]."""
        if not texts:
            raise BadInputError("no text given")
        (vectors,) = self.session.run([EMBEDDING_OUTPUT], self.batch(texts))
        return vectors


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [n, d] arrays (a [n, m] matrix when both have several rows)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T

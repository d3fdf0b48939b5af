"""``EmbeddingModel`` on the zoo's BERT exports: the vectors are the torch model's.

The reference is the very module the export traced (``tiny_zoo.torch_module``:
the encoder with its pooling), fed the same token ids and mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgraph.errors import BadInputError
from qgraph.runtime.embed import EmbeddingModel, cosine_similarity

TEXTS = ["a", "The quick brown fox jumps over the lazy dog.", "émigré naïve café ✓", "short text", "x" * 60]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_embeddings_equal_torch(tiny_zoo, exporter) -> None:
    folder = tiny_zoo.export("bert", exporter).output_dir
    model = EmbeddingModel.load(folder, threads=1)
    vectors = model.embed(TEXTS)
    feeds = model.batch(TEXTS)
    assert feeds["attention_mask"].sum(axis=1).tolist() != [feeds["attention_mask"].shape[1]] * len(TEXTS)  # padded
    with torch.no_grad():
        expected = tiny_zoo.torch_module("bert")(torch.from_numpy(feeds["input_ids"]),
                                                 torch.from_numpy(feeds["attention_mask"])).numpy()
    assert vectors.shape == expected.shape
    cosine = np.diag(cosine_similarity(vectors, expected))
    assert cosine.min() >= 0.99999, cosine


def test_a_text_alone_embeds_as_in_a_padded_batch(tiny_zoo) -> None:
    model = EmbeddingModel.load(tiny_zoo.export("bert", "dynamo").output_dir, threads=1)
    batch = model.embed(TEXTS)
    alone = np.concatenate([model.embed([t]) for t in TEXTS])
    assert np.diag(cosine_similarity(batch, alone)).min() >= 0.99999


def test_a_causal_lm_export_is_not_an_embedding_model(tiny_zoo) -> None:
    with pytest.raises(BadInputError, match="no 'sentence_embedding' output"):
        EmbeddingModel.load(tiny_zoo.export("llama", "dynamo").output_dir, threads=1)

"""Sentence embeddings the seeds' way: AutoModel with pooling, compiled for a few lengths, then generate.

    python examples/embedding_quickstart.py                      # all-MiniLM-L6-v2 (packaged)
    python examples/embedding_quickstart.py --model DIR          # any local encoder folder
"""
from __future__ import annotations

import argparse

import numpy as np

import qgraph

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="all-minilm-l6-v2", help="packaged name or Hugging Face encoder folder")
parser.add_argument("--pooling", default="mean", choices=("mean", "cls", "max"))
args = parser.parse_args()

model = qgraph.AutoModel.from_pretrained(args.model, pooling=args.pooling)
bundle = model.compile(seq_len=[32, 64])  # one specialization per length; inputs go to the smallest that fits
print(f"bundle: {bundle}")
sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue today."]
vectors = model.generate(sentences)
unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
print(f"embeddings: {vectors.shape}")
print("cosine similarity:")
for row, sentence in enumerate(sentences):
    print(f"  {' '.join(f'{s:+.4f}' for s in unit[row] @ unit.T)}  {sentence}")

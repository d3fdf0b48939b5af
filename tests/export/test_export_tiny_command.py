"""``qgraph export tiny-<arch>``: the zoo's tiny random-weight models from the command line.

The trap: the guide's examples need a small model to try a pass on, and the
only way to get one was to find ``qgraph.export.zoo.write_tiny_folder``.
"""

from __future__ import annotations

import io
import json

import onnx
import pytest

from qgraph.export.command import main
from qgraph.export.zoo import TINY_ARCHS


def run(*argv) -> tuple[int, str]:
    out = io.StringIO()
    code = main([str(a) for a in argv], out=out)
    return code, out.getvalue()


def test_export_tiny_arch_writes_the_zoo_model(tmp_path):
    out = tmp_path / "tiny-llama"
    code, text = run("tiny-llama", "-o", out, "--cache-dir", tmp_path / "cache", "--exporter", "torchscript", "--quiet")
    assert code == 0, text
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["model_type"] == "llama" and manifest["task"] == "causal-lm"
    model = onnx.load(out / "model.onnx")
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    vocab = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim][-1]
    assert vocab == 256  # the zoo's vocabulary, not a real model's


def test_an_unknown_tiny_arch_is_bad_input_listing_the_zoo(tmp_path, capsys):
    code, text = run("tiny-nosuch", "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert code == 2 and text == ""
    err = capsys.readouterr().err
    assert "tiny-nosuch" in err and all(f"tiny-{name}" in err for name in TINY_ARCHS)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_help_names_the_tiny_models(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "tiny-llama" in capsys.readouterr().out

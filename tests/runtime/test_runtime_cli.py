"""``qgraph generate`` / ``qgraph embed`` / ``qgraph demo`` on the command line: output and exit codes."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

from qgraph.cli import main


def run(*argv) -> tuple[int, str]:
    out = io.StringIO()
    code = main([str(a) for a in argv], out=out)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def llama_dir(tiny_zoo):
    """The zoo Llama's dynamo export: the no-cache graph and a byte-level tokenizer (token id = byte)."""
    return tiny_zoo.export("llama", "dynamo").output_dir


def test_generate_streams_text_and_prints_statistics(llama_dir, tmp_path) -> None:
    report = tmp_path / "r.json"
    code, text = run("generate", llama_dir, "--prompt", "Hello", "--max-new-tokens", "6", "--threads", "1",
                     "--json", report)
    assert code == 0
    assert text.splitlines()[1].startswith("Hello")  # the prompt, then the streamed continuation
    for figure in ("TTFT", "prefill", "decode", "end-to-end"):
        assert figure in text
    data = json.loads(report.read_text())
    (row,) = data["rows"]
    assert row["prompt_ids"] == list(b"Hello")  # the zoo's byte-level tokenizer
    assert 1 <= len(row["token_ids"]) <= 6 and row["stop_reason"] in ("eos", "length")
    assert data["stats"]["generated_tokens"] == len(row["token_ids"])


def test_generated_tokens_equal_transformers_greedy_generate(llama_dir, tmp_path) -> None:
    from qgraph.export.zoo import build_tiny

    report = tmp_path / "r.json"
    code, _ = run("generate", llama_dir, "--prompt", "Once upon", "--prompt", "a", "--max-new-tokens", "8",
                  "--threads", "1", "--json", report)
    assert code == 0
    model = build_tiny("llama")
    for row in json.loads(report.read_text())["rows"]:
        prompt = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                      do_sample=False, eos_token_id=2, pad_token_id=0)
        assert row["token_ids"] == expected[0, prompt.shape[1]:].tolist()


def test_a_batch_from_a_prompts_file_prints_each_row(llama_dir, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\nsecond one\n")
    code, text = run("generate", llama_dir, "--prompts-file", prompts, "--max-new-tokens", "3", "--threads", "1")
    assert code == 0
    assert "[0] first" in text and "[1] second one" in text and "batch 2" in text


def test_bad_inputs_exit_2_naming_what_is_wrong(llama_dir, tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("generate", empty, "--prompt", "x")[0] == 2
    assert f"{empty / 'model.onnx'}: no such file" in capsys.readouterr().err

    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    shutil.copy(llama_dir / "model.onnx", no_tokenizer / "model.onnx")
    assert run("generate", no_tokenizer, "--prompt", "x")[0] == 2
    assert f"{no_tokenizer / 'tokenizer.json'}: no such file" in capsys.readouterr().err

    assert run("generate", llama_dir, "--prompts-file", tmp_path / "missing.txt")[0] == 2
    assert "missing.txt" in capsys.readouterr().err

    assert run("generate", llama_dir)[0] == 2
    assert "give a prompt" in capsys.readouterr().err

    assert run("generate", llama_dir, "--prompt", "x", "--max-new-tokens", "0")[0] == 2
    assert run("generate", llama_dir, "--prompt", "x", "--chat")[0] == 2
    assert "no chat template" in capsys.readouterr().err
    assert run("embed", llama_dir, "--text", "x")[0] == 2
    assert "no 'sentence_embedding' output" in capsys.readouterr().err


def test_generate_refuses_an_encoder_and_embed_prints_vectors(tiny_zoo, capsys) -> None:
    bert = tiny_zoo.export("bert", "dynamo").output_dir
    assert run("generate", bert, "--prompt", "x")[0] == 2
    assert "not a language-model graph" in capsys.readouterr().err

    code, text = run("embed", bert, "--text", "one", "--text", "two words", "--json")
    assert code == 0
    data = json.loads(text)
    assert [e["text"] for e in data["embeddings"]] == ["one", "two words"]
    assert all(len(e["vector"]) == data["dim"] for e in data["embeddings"])
    code, text = run("embed", bert, "--text", "one", "--text", "two words")
    assert code == 0 and "cosine similarity" in text


def test_demo_with_an_unknown_preset_fails_before_exporting(tmp_path, capsys) -> None:
    assert run("demo", "--presets", "no-such-preset", "--out", tmp_path / "demo")[0] == 2
    assert "the demo runs preset 'no-such-preset'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_a_preset_whose_result_has_no_kv_cache(tiny_zoo, tmp_path) -> None:
    from qgraph.demo import run_preset
    from qgraph.errors import PassFailure
    from qgraph.registry import default_registry

    export_dir = tiny_zoo.export("llama", "dynamo").output_dir
    with pytest.raises(PassFailure, match="preset 'cleanup' gave a graph without a KV cache"):
        run_preset("cleanup", export_dir, tmp_path, default_registry())


def test_demo_pass_table_merges_fixpoint_rounds_and_keeps_every_record() -> None:
    from qgraph.demo import _pass_groups
    from qgraph.manager import PassRecord

    def rec(name, iteration=None, prerequisite_of=None):
        return PassRecord(name, 0.1, False, 5, 5, {}, fixpoint_iteration=iteration, prerequisite_of=prerequisite_of)

    records = [rec("cf", 1), rec("dce", 1), rec("cf", 2), rec("dce", 2), rec("opset-upgrade", prerequisite_of="attention"),
               rec("attention"), rec("cf", 1), rec("dce", 1), rec("cf", 1), rec("dce", 1)]
    groups = _pass_groups(records)
    assert [name for name, _ in groups] == ["fixpoint(cf, dce) x2", "opset-upgrade (for attention)", "attention",
                                            "fixpoint(cf, dce) x1", "fixpoint(cf, dce) x1"]
    assert [r for _, rs in groups for r in rs] == records

"""The seeds' flow as an API (qgraph.auto) and commands (qgraph infer/compile/execute), on tiny zoo models."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qgraph
from qgraph.cli import main

PROMPTS = ["hello there", "abc", "xyz def"]
_NO_DEADLINE = settings(deadline=None, max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, export_cache_dir: Path) -> dict[str, Path]:
    from qgraph.export.zoo import write_tiny_folder

    base = tmp_path_factory.mktemp("auto")
    return {"llama": write_tiny_folder("llama", base / "llama"), "bert": write_tiny_folder("bert", base / "bert")}


@pytest.fixture(scope="module")
def causal(folders: dict[str, Path], export_cache_dir: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGRAPH_CACHE", str(export_cache_dir))
        model = qgraph.AutoModelForCausalLM.from_pretrained(folders["llama"])
        model.export()
    return model


def _bundles(cache: Path) -> list[str]:
    folder = cache / "bundles"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _reference_ids(export_dir: Path, prompts: list[str], n: int) -> list[list[int]]:
    """Greedy ids of the no-cache export, one prompt at a time."""
    from qgraph.runtime.generate import load_generator

    gen = load_generator(export_dir)
    return [gen.generate([p], max_new_tokens=n).token_ids[0] for p in prompts]


# --- AutoModelForCausalLM and qgraph infer ---------------------------------------------------------


@pytest.mark.parametrize("target", ["qaic", "ort"])
def test_api_and_infer_give_the_export_tokens(causal, folders, target: str, tmp_path: Path) -> None:
    bundle = causal.compile(target=target, prefill_seq_len=4, ctx_len=24, batch_size=2)
    api = causal.generate(PROMPTS, generation_len=6, stream=False)
    assert len(api.generated_ids) == 3 and api.batch_size == 2  # the last, half-full batch was run
    assert api.generated_ids == _reference_ids(causal.export_dir, PROMPTS, 6)

    report = tmp_path / "infer.json"
    out = io.StringIO()
    code = main(["infer", "--local-model-dir", str(folders["llama"]), "--prompt", "|".join(PROMPTS),
                 "--prompt-len", "4", "--ctx-len", "24", "--batch-size", "2", "--generation-len", "6",
                 "--target", target, "--json", str(report)], out=out)
    assert code == 0
    cli = json.loads(report.read_text())
    assert cli["generated_ids"] == api.generated_ids
    assert cli["generated_texts"] == api.generated_texts
    assert f"bundle: {bundle}" in out.getvalue()  # the same bundle: the command hit the API's cache entry
    assert "Performance Stats" in out.getvalue()

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"] == target and manifest["backend"] == "onnxruntime-cpu"
    assert manifest["verification"]["result"] == "equivalent"
    assert manifest["qgraph_version"] == qgraph.__version__
    assert manifest["options"]["ctx_len"] == 24 and manifest["options"]["prefill_seq_len"] == 4
    assert {"model.onnx", "specializations.json", "tokenizer.json", "config.json"} <= set(os.listdir(bundle))


def test_compile_and_execute_commands_match_exec_kv(causal, folders, tmp_path: Path) -> None:
    out = io.StringIO()
    assert main(["compile", "--model-name", str(folders["llama"]), "--target", "ort", "--prompt-len", "4",
                 "--ctx-len", "20"], out=out) == 0
    bundle = Path(out.getvalue().strip().splitlines()[-1])
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("hello there\n\nabc\n")
    report = tmp_path / "execute.json"
    assert main(["execute", str(bundle), "--prompts-txt-file-path", str(prompts_file), "--generation-len", "4",
                 "--json", str(report)], out=io.StringIO()) == 0
    info = qgraph.exec_kv(None, bundle, prompt="hello there|abc", generation_len=4, stream=False)
    assert json.loads(report.read_text())["generated_ids"] == info.generated_ids
    assert info.prompts == ["hello there", "abc"]


def test_a_repeated_compile_runs_nothing(causal, export_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qgraph.manager import PassManager

    first = causal.compile(target="ort", prefill_seq_len=4, ctx_len=20, batch_size=1)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    runs = []
    real_run = PassManager.run
    monkeypatch.setattr(PassManager, "run", lambda self, model: runs.append(1) or real_run(self, model))
    again = causal.compile(target="ort", prefill_seq_len=4, ctx_len=20, batch_size=1)
    assert again == first and runs == []
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    other = causal.compile(target="ort", prefill_seq_len=4, ctx_len=21, batch_size=1)  # other options: new bundle
    assert other != first and runs == [1]


def test_precision_runs_the_quantized_preset_and_is_part_of_the_key(causal) -> None:
    import onnx

    fp32 = causal.compile(target="ort", prefill_seq_len=4, ctx_len=20, batch_size=1)
    int8 = causal.compile(target="ort", prefill_seq_len=4, ctx_len=20, batch_size=1, precision="int8")
    assert int8 != fp32
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["preset"] == "ort-int8" and manifest["options"]["precision"] == "int8"
    assert manifest["verification"]["result"] == "equivalent"  # replayed against the export quantized alike
    assert manifest["verification"]["quantization_budget"]["agreement"] >= 0.9
    assert "quantize" in [p["name"] for p in manifest["passes"]]
    assert not (int8 / ".quantized-export").exists()
    ops = {n.op_type for n in onnx.load(int8 / "model.onnx", load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    assert "MatMulNBits" not in {n.op_type for n in onnx.load(fp32 / "model.onnx", load_external_data=False).graph.node}
    symmetric = causal.compile(target="ort", prefill_seq_len=4, ctx_len=20, batch_size=1, precision="int8",
                               quantize={"symmetric": True})
    assert symmetric not in (int8, fp32)
    info = causal.generate(["hello there"], generation_len=3, stream=False)
    assert len(info.generated_ids[0]) == 3


@pytest.fixture(scope="module")
def batch_bundles(causal, export_cache_dir: Path) -> dict[int, Path]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGRAPH_CACHE", str(export_cache_dir))
        return {b: causal.compile(target="qaic", prefill_seq_len=4, ctx_len=20, batch_size=b) for b in (1, 2, 3)}


@_NO_DEADLINE
@given(count=st.integers(1, 5), batch=st.integers(1, 3))
def test_every_prompt_is_run_whatever_the_batch(causal, batch_bundles, count: int, batch: int) -> None:
    prompts = [f"p{i} {'x' * i}" for i in range(count)]
    info = qgraph.exec_kv(None, batch_bundles[batch], prompt=prompts, generation_len=3, stream=False)
    assert info.batch_size == batch
    assert info.prompts == prompts and len(info.generated_ids) == count and len(info.generated_texts) == count
    assert info.generated_ids == _reference_ids(causal.export_dir, prompts, 3)


def test_generate_streams_text_and_prints_the_stats(causal) -> None:
    causal.compile(target="qaic", prefill_seq_len=4, ctx_len=24, batch_size=1)
    out = io.StringIO()
    info = causal.generate(["hello there"], generation_len=4, out=out)
    text = out.getvalue()
    assert "Performance Stats" in text and "TTFT" in text and "Decode" in text and "E2E" in text
    m = info.perf_metrics
    assert m.ttft > 0 and m.end_to_end >= m.ttft and m.decode_tokens_per_second > 0
    assert info.stats.generated_tokens == 4


def test_continuous_batching_api_and_infer_give_the_export_tokens(folders, export_cache_dir: Path,
                                                                   tmp_path: Path) -> None:
    """The seeds' flow with continuous_batching=True: more prompts than cache rows, each with its own tokens."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGRAPH_CACHE", str(export_cache_dir))
        model = qgraph.AutoModelForCausalLM.from_pretrained(folders["llama"], continuous_batching=True)
        bundle = model.compile(prefill_seq_len=4, ctx_len=24, full_batch_size=2, comp_ctx_lengths=[12, 24])
        prompts = [*PROMPTS, "one more prompt"]
        info = model.generate(prompts, generation_len=5, stream=False)
    assert info.generated_ids == _reference_ids(model.export_dir, prompts, 5)
    assert info.stats.requests == 4 and info.stats.slots == 2
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["verification"]["slots"].startswith("equivalent")
    specs = {e["name"]: e["symbols"] for e in json.loads((bundle / "specializations.json").read_text())["specializations"]}
    assert specs["Decode_1"] == {"batch_size": "2", "seq_len": "1", "ctx_len": "24", "full_batch_size": "2",
                                 "comp_ctx_lengths": "24"}
    assert specs["Prefill_0"]["batch_size"] == "1" and specs["Prefill_0"]["comp_ctx_lengths"] == "12"


# --- bad arguments: a clear error, nothing written ---------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"target": "cloud"},
    {"prefill_seq_len": 32, "ctx_len": 32},
    {"prefill_seq_len": 8, "ctx_len": 4},
    {"batch_size": 0},
    {"kv_dtype": "int4"},
    {"full_batch_size": 4},  # without continuous_batching=True
    {"comp_ctx_lengths": [256]},  # beyond ctx_len
    {"target": "ort", "comp_ctx_lengths": [16]},  # a device feature
    {"num_speculative_tokens": 2},
    {"kv_cache": {"ctx_len": 64}},
    {"target": "ort", "precision": "int3"},
    {"target": "qaic", "precision": "int4"},
    {"target": "ort", "precision": "gguf"},  # the tiny model is a folder, not a GGUF file
    {"target": "ort", "quantize": {"bits": 8}},  # quantize options with fp32: no quantize pass to take them
])
def test_bad_compile_arguments_write_nothing(causal, export_cache_dir: Path, kwargs: dict) -> None:
    before = _bundles(export_cache_dir)
    with pytest.raises(qgraph.BadInputError) as error:
        causal.compile(**kwargs)
    assert _bundles(export_cache_dir) == before
    if "num_speculative_tokens" in kwargs:
        assert "not implemented" in str(error.value)


@_NO_DEADLINE
@given(prefill=st.integers(1, 64), shortfall=st.integers(0, 64))
def test_ctx_len_not_above_prefill_is_refused(causal, prefill: int, shortfall: int) -> None:
    with pytest.raises(qgraph.BadInputError, match="ctx_len"):
        causal.compile(prefill_seq_len=prefill, ctx_len=max(prefill - shortfall, 1))


def test_a_prompt_longer_than_the_context_is_refused(causal, folders, export_cache_dir: Path) -> None:
    causal.compile(target="qaic", prefill_seq_len=4, ctx_len=12)
    with pytest.raises(qgraph.BadInputError, match="tokens"):
        causal.generate(["x" * 40], generation_len=2, stream=False)
    before = _bundles(export_cache_dir)
    err = io.StringIO()
    code = main(["infer", "--local-model-dir", str(folders["llama"]), "--prompt", "y" * 40, "--prompt-len", "4",
                 "--ctx-len", "13"], out=err)
    assert code == 2 and _bundles(export_cache_dir) == before


def test_unknown_target_exits_2_in_the_command(folders, export_cache_dir: Path) -> None:
    before = _bundles(export_cache_dir)
    assert main(["infer", "--local-model-dir", str(folders["llama"]), "--prompt", "hi", "--target", "aic100"],
                out=io.StringIO()) == 2
    assert main(["infer", "--local-model-dir", str(folders["llama"]), "--prompt", "hi", "--full-batch-size", "4",
                 "--target", "ort"], out=io.StringIO()) == 2  # continuous batching is a device feature
    assert main(["execute", str(folders["llama"]), "--prompt", "hi"], out=io.StringIO()) == 2  # not a bundle
    assert _bundles(export_cache_dir) == before


def test_an_encoder_is_not_a_causal_lm(folders) -> None:
    with pytest.raises(qgraph.BadInputError, match="AutoModel"):
        qgraph.AutoModelForCausalLM.from_pretrained(folders["bert"])
    with pytest.raises(qgraph.BadInputError, match="causal LM"):
        qgraph.AutoModel.from_pretrained(folders["llama"])
    with pytest.raises(qgraph.BadInputError, match="full_batch_size is required"):
        qgraph.AutoModelForCausalLM.from_pretrained(folders["llama"], continuous_batching=True).compile()
    with pytest.raises(qgraph.BadInputError, match="num_hidden_layers"):
        qgraph.AutoModelForCausalLM.from_pretrained(folders["llama"], num_hidden_layers=1)


def test_common_loader_picks_the_class(folders) -> None:
    assert isinstance(qgraph.CommonLoader.from_pretrained(folders["llama"]), qgraph.AutoModelForCausalLM)
    assert isinstance(qgraph.CommonLoader.from_pretrained(folders["bert"], pooling="cls"), qgraph.AutoModel)


def test_unknown_backend_is_refused() -> None:
    from qgraph.runtime.backend import get_backend

    with pytest.raises(qgraph.BadInputError, match="no runtime backend"):
        get_backend("qaic-device")
    assert get_backend("onnxruntime-cpu", target="qaic").name == "onnxruntime-cpu"


def test_load_hf_tokenizer_gives_a_pad_token(folders, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["llama"])
    tok.add_special_tokens({"eos_token": "<eos>"})
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id is None
    fixed = qgraph.load_hf_tokenizer(tmp_path)
    assert fixed.pad_token_id == fixed.eos_token_id is not None
    assert fixed.padding_side == "right"
    assert qgraph.load_hf_tokenizer(tmp_path, padding_side="left").padding_side == "left"
    with pytest.raises(qgraph.BadInputError):
        qgraph.load_hf_tokenizer(tmp_path, padding_side="middle")


# --- AutoModel (encoders) ------------------------------------------------------------------------


def _torch_pooled(folder: Path, texts: list[str], pooling: str) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    rows = []
    for text in texts:  # one at a time: no padding in the reference
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        rows.append({"mean": hidden.mean(0), "cls": hidden[0], "max": hidden.max(0).values}[pooling].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_encoder_vectors_equal_torch_and_the_embed_command(folders, export_cache_dir: Path, pooling: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["hello", "a somewhat longer sentence", "mid size"]
    model = qgraph.AutoModel.from_pretrained(folders["bert"], pooling=pooling)
    bundle = model.compile(seq_len=[16, 32])
    vectors = model.generate(texts)
    reference = _torch_pooled(folders["bert"], texts, pooling)
    cos = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    assert vectors.shape == reference.shape and (cos >= 0.99999).all(), cos

    out = io.StringIO()
    assert main(["embed", str(bundle), "--json", *(a for t in texts for a in ("--text", t))], out=out) == 0
    cli = np.array([row["vector"] for row in json.loads(out.getvalue())["embeddings"]])
    np.testing.assert_allclose(cli, vectors, rtol=1e-4, atol=1e-5)

    specs = json.loads((bundle / "specializations.json").read_text())["specializations"]
    assert specs == [{"name": "Embedding_0", "symbols": {"seq_len": "16"}},
                     {"name": "Embedding_1", "symbols": {"seq_len": "32"}}]
    with pytest.raises(qgraph.BadInputError, match="seq_len"):
        model.generate(["z" * 40])


def test_encoder_normalize_gives_unit_vectors_along_the_pooled_ones(folders) -> None:
    texts = ["hello", "another one"]
    plain = qgraph.AutoModel.from_pretrained(folders["bert"], pooling="mean", normalize=False)
    plain.compile(seq_len=32)
    unit = qgraph.AutoModel.from_pretrained(folders["bert"], pooling="mean", normalize=True)
    unit.compile(seq_len=32)
    raw, normed = plain.generate(texts), unit.generate(texts)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(normed, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_perf_metrics_average_ttft_over_batches() -> None:
    from qgraph.auto import PerfMetrics
    from qgraph.runtime.stats import LatencyStats

    def part(ttft: float) -> LatencyStats:
        return LatencyStats(batch=1, prompt_tokens=4, generated_tokens=3, decode_tokens=2, prefill_runs=1,
                            decode_steps=2, ttft=ttft, decode_seconds=0.5, end_to_end=ttft + 0.5)

    metrics = PerfMetrics.from_batches([part(0.1), part(0.3)])
    assert metrics.ttft == pytest.approx(0.2)
    assert metrics.prefill_tokens_per_second == pytest.approx(8 / 0.4)
    assert metrics.decode_tokens_per_second == pytest.approx(4 / 1.0)
    assert metrics.total_tokens_per_second == pytest.approx(6 / 1.4)
    assert metrics.end_to_end == pytest.approx(1.4)

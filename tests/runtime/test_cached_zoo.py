"""Generation with real KV-cached graphs: zoo exports through the ``ort`` and ``qaic`` presets.

The presets run exactly as ``qgraph demo`` runs them (:func:`qgraph.demo.run_preset`).
The no-cache export recomputing the prefix is the reference; the cached
graphs of both styles (``ort``: concat cache, one prefill; ``qaic``:
retained cache of fixed ctx_len, prefill in chunks of the
specializations.json seq_len, custom ops run through their function bodies)
must generate exactly its tokens for a padded batch.
"""

from __future__ import annotations

import pytest

from qgraph import io
from qgraph.demo import run_preset
from qgraph.registry import default_registry
from qgraph.runtime.generate import load_generator

PROMPTS = ["Hello world, this is a prompt longer than one prefill chunk of thirty-two tokens", "a", "KV"]
# gpt2-dynamo: learned positions, and a fused-QKV Split whose num_outputs the
# qaic preset's downgrade to opset 17 has to spell as explicit sizes.
CASES = [("llama", "dynamo"), ("gemma2", "dynamo"), ("phi", "torchscript"), ("gpt2", "dynamo")]


@pytest.mark.parametrize(("arch", "exporter"), CASES)
def test_preset_graphs_generate_the_no_cache_tokens(tiny_zoo, tmp_path, arch, exporter) -> None:
    export_dir = tiny_zoo.export(arch, exporter).output_dir
    expected = load_generator(export_dir, threads=1).generate(PROMPTS, max_new_tokens=12).token_ids
    for preset, kind in (("ort", "concat KV cache"), ("qaic", "retained KV cache")):
        run = run_preset(preset, export_dir, tmp_path, default_registry())
        generator = load_generator(run.folder, threads=1)
        if preset == "ort" and any(n.op_type == "GroupQueryAttention" for n in io.load(run.folder / "model.onnx").graph):
            kind = "shared-buffer KV cache"  # lower-gqa took the layers: one buffer for past and present
        assert generator.engine.kind == kind
        result = generator.generate(PROMPTS, max_new_tokens=12)
        assert result.token_ids == expected, (arch, exporter, preset)
        if kind == "retained KV cache":  # prompts (one token per byte) in chunks of specializations.json's seq_len
            engine = generator.engine
            chunk = engine.default_chunk
            assert chunk is not None and chunk < len(PROMPTS[0].encode())
            chunks = [-(-len(p.encode()) // chunk) for p in PROMPTS]
            # a batch fixed at 1 (specialization) runs row by row; a symbolic batch runs the padded batch
            assert result.stats.prefill_runs == (sum(chunks) if engine.fixed_batch == 1 else max(chunks))


# Plain exports (the model counts positions itself): llama from column 0, bloom through ALiBi from the mask.
PLAIN_CASES = [("llama", "dynamo"), ("bloom", "torchscript"), ("gpt_neo", "dynamo")]


@pytest.mark.parametrize(("arch", "exporter"), PLAIN_CASES)
def test_presets_on_plain_exports_generate_each_prompt_as_alone(tiny_zoo, tmp_path, arch, exporter) -> None:
    """A plain export shifts a left-padded row's positions; the cached graphs give every row its own meaning.

    The reference is therefore the no-cache export run on each prompt alone
    (no padding); the cached graphs generate the padded batch.
    """
    export_dir = tiny_zoo.export(arch, exporter, wrapper="plain").output_dir
    alone = load_generator(export_dir, threads=1)
    expected = [alone.generate([p], max_new_tokens=12).token_ids[0] for p in PROMPTS]
    for preset in ("ort", "qaic"):
        run = run_preset(preset, export_dir, tmp_path, default_registry())
        result = load_generator(run.folder, threads=1).generate(PROMPTS, max_new_tokens=12)
        assert result.token_ids == expected, (arch, exporter, preset)

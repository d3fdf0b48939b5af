"""truncate-layers keeps a decoder's first N layers, its final norm and head: a draft for speculative decoding.

The reference is the Hugging Face model itself with its layer list cut to
the first layer (same seeded weights as the zoo export): the truncated graph
must give its logits (fp32, 1e-4), for every zoo decoder. That those logits
differ from the full model's is checked too, so the comparison cannot pass
by leaving the graph whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qgraph import io as qio
from qgraph.errors import BadInputError
from qgraph.export.zoo import TINY_ARCHS, build_tiny
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.runtime.session import open_session

DECODERS = [name for name, arch in TINY_ARCHS.items() if arch.task == "causal-lm"]
_LAYER_LISTS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


def _first_layer_only(model: torch.nn.Module) -> torch.nn.Module:
    for path in _LAYER_LISTS:
        *parents, name = path.split(".")
        owner = model
        try:
            for part in parents:
                owner = getattr(owner, part)
            layers = getattr(owner, name)
        except AttributeError:
            continue
        setattr(owner, name, layers[:1])
        model.config.num_hidden_layers = 1
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:1]
        return model
    raise AssertionError(f"no layer list in {type(model).__name__}")


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    session = open_session(str(path), threads=1)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = {i.name for i in session.get_inputs()}
    return session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


@pytest.mark.parametrize("arch", DECODERS)
def test_the_first_layer_with_the_head_is_the_model_cut_to_one_layer(tiny_zoo, tmp_path, arch: str) -> None:
    source = Path(tiny_zoo.export(arch, "dynamo").model_path)
    model = qio.load(source)
    PassManager(Pipeline([{"pass": "truncate-layers", "options": {"layers": 1}}])).run(model)
    assert sum(n.op_type == "Attention" for n in model.graph) == 1
    qio.save(model, tmp_path / "model.onnx")
    ids = np.random.default_rng(0).integers(0, 256, (2, 7))
    got = _run(tmp_path / "model.onnx", ids)
    with torch.no_grad():
        want = _first_layer_only(build_tiny(arch))(input_ids=torch.tensor(ids),
                                                    attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    # the full model says something else (relative: Granite's logits are divided by 8 and small)
    assert np.abs(_run(source, ids) - got).max() > 1e-2 * np.abs(got).max()


@pytest.mark.parametrize("layers", [0, 2, 5])
def test_a_count_outside_the_model_names_the_option(tiny_zoo, layers: int) -> None:
    model = qio.load(Path(tiny_zoo.export("llama", "dynamo").model_path))
    with pytest.raises(BadInputError, match=r"truncate-layers\.layers"):
        PassManager(Pipeline([{"pass": "truncate-layers", "options": {"layers": layers}}])).run(model)

"""The longest sequence a model says it takes: from its graph's metadata or the config.json beside it.

``lower-gqa`` writes the rotary angles of every position it will ever see
into cos/sin cache initializers, so it needs a bound. A fixed guess is wrong
both ways: rows beyond the model's own ``max_position_embeddings`` are
positions the model was never meant to take (and memory: 8192 rows x head
size per table), and a model with a longer context (Qwen2's 32768) would be
refused past 8192 tokens by a graph that could go on. The bound the model
declares is taken instead, in this order:

1. ``qgraph.kv.max_positions`` in the graph's metadata: a bound a pass
   already gave the cached graph (the cos/sin caches it holds);
2. ``max_position_embeddings`` (or ``n_positions``, ``max_sequence_length``,
   GPT-2's and others' names for it) in the ``config.json`` beside the file
   the model was loaded from (every qgraph export folder has one, copied
   from the Hugging Face model).

:func:`declared_max_positions` returns the bound and where it came from,
or None when the model declares none.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from qgraph.io import SOURCE_PATH_KEY
from qgraph.verify.kv_contract import MAX_POSITIONS_KEY

__all__ = ["declared_max_positions"]

_CONFIG_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _positive_int(raw) -> int | None:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None
    return value if value > 0 and not isinstance(raw, bool) else None


def declared_max_positions(model: ir.Model) -> tuple[int, str] | None:
    """``(bound, where it was read)`` if the model declares how many positions it takes, else None."""
    meta = _positive_int(model.metadata_props.get(MAX_POSITIONS_KEY))
    if meta is not None:
        return meta, f"metadata {MAX_POSITIONS_KEY}"
    source = model.meta.get(SOURCE_PATH_KEY)
    if not source:
        return None
    config_path = Path(source).parent / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    configs = [config, config.get("text_config")] if isinstance(config, dict) else []
    for entry in configs:
        if not isinstance(entry, dict):
            continue
        for key in _CONFIG_KEYS:
            value = _positive_int(entry.get(key))
            if value is not None:
                return value, f"{key} in {config_path}"
    return None

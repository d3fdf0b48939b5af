"""The files a Cloud AI 100 style compiler reads beside a retained-state model.

* ``specializations.json``: the shapes to compile, one entry per graph the
  device keeps (QEfficient's format: values as strings, the symbolic dims of
  the model by name): prefill with ``seq_len`` = the prompt chunk, decode
  with ``seq_len`` 1, both at the same ``batch_size`` and ``ctx_len``.
* ``custom_io.yaml``: the precision of the inputs and outputs the device
  keeps in another dtype than the graph declares -- the KV cache, held in
  fp16 on the device while the exported graph is fp32 (the compiler converts
  the network to fp16; the retained state must match it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

__all__ = ["custom_io_yaml", "specializations_json"]


def specializations_json(*, batch_size: int, prefill_len: int, ctx_len: int,
                         extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """``extra``: symbols an option adds or overrides per phase (``{"Prefill": {...}, "Decode": {...}}``)."""
    extra = extra or {}
    entries = [
        {"batch_size": str(batch_size), "seq_len": str(prefill_len), "ctx_len": str(ctx_len),
         **extra.get("Prefill", {})},
        {"batch_size": str(batch_size), "seq_len": "1", "ctx_len": str(ctx_len), **extra.get("Decode", {})},
    ]
    return json.dumps({"specializations": entries}, indent=2) + "\n"


def custom_io_yaml(names: Sequence[str], precision: str) -> str:
    """One ``IOName``/``Precision`` entry per name, the list format qaic-exec's custom IO file takes."""
    return "".join(f" - IOName: {name}\n   Precision: {precision}\n\n" for name in names)

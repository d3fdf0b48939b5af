"""The files a Cloud AI 100 style compiler reads beside a retained-state model.

* ``specializations.json``: the shapes to compile, one entry per graph the
  device keeps, in QEfficient's current form -- ``{"specializations":
  [{"name": "Prefill", "symbols": {...}}, {"name": "Decode", ...}]}``,
  values as strings, the symbols being the model's symbolic dims by name --
  or the older flat list of symbol dicts. Prefill has ``seq_len`` = the
  prompt chunk, decode ``seq_len`` 1; with continuous batching prefill runs
  one sequence (``batch_size`` 1) and decode all ``full_batch_size`` rows;
  with compute-context lengths each phase gets one entry per length
  (QEfficient's names then carry a suffix: ``Prefill_0``, ``Prefill_1``).
* ``custom_io.yaml``: the precision of the inputs and outputs the device
  keeps in another dtype than the graph declares -- the KV cache, held in
  fp16 (or mxint8) on the device while the exported graph is fp32 (the
  compiler converts the network to fp16; the retained state must match it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

__all__ = ["custom_io_yaml", "specialization_entries", "specializations_json"]


def specialization_entries(*, batch_size: int, prefill_len: int, ctx_len: int, full_batch_size: int | None = None,
                           comp_ctx_lengths: Sequence[int] = (), decode_len: int = 1,
                           extra: Mapping[str, Mapping[str, int]] | None = None,
                           phases: Sequence[str] = ("Prefill", "Decode"),
                           fixed: Sequence[str] = ()) -> list[tuple[str, dict[str, str]]]:
    """(graph name, symbols) for every shape to compile, names made unique the way QEfficient does.

    ``extra`` adds symbols per phase (``{"Prefill": {...}, "Decode": {...}}``);
    ``phases``: the phases this graph serves (one, for disaggregated serving);
    ``fixed``: symbols the graph fixed to a number (not listed).
    """
    entries = []
    for name, seq in (("Prefill", prefill_len), ("Decode", decode_len)):
        if name not in phases:
            continue
        symbols = {"batch_size": batch_size, "seq_len": seq, "ctx_len": ctx_len}
        if full_batch_size:
            symbols["full_batch_size"] = full_batch_size
            if name == "Decode":
                symbols["batch_size"] = full_batch_size
        symbols.update((extra or {}).get(name, {}))
        if name == "Decode" and "Prefill" in phases and seq == prefill_len and not full_batch_size \
                and not comp_ctx_lengths:
            continue  # the same shape twice (a one-token prefill)
        for ccl in comp_ctx_lengths or (None,):
            entry = dict(symbols)
            if ccl is not None:
                entry["comp_ctx_lengths"] = ccl
            entries.append((name, {k: str(v) for k, v in entry.items() if k not in fixed}))
    counts = {n: sum(1 for m, _ in entries if m == n) for n, _ in entries}
    seen: dict[str, int] = {}
    named = []
    for name, symbols in entries:
        if counts[name] > 1:
            index = seen.get(name, 0)
            seen[name] = index + 1
            name = f"{name}_{index}"
        named.append((name, symbols))
    return named


def specializations_json(*, named: bool = True, **shapes) -> str:
    entries = specialization_entries(**shapes)
    if named:
        data = [{"name": name, "symbols": symbols} for name, symbols in entries]
    else:
        data = [symbols for _, symbols in entries]
    return json.dumps({"specializations": data}, indent=2) + "\n"


def custom_io_yaml(names: Sequence[str], precision: str) -> str:
    """One ``IOName``/``Precision`` entry per name, the list format qaic-exec's custom IO file takes."""
    return "".join(f" - IOName: {name}\n   Precision: {precision}\n\n" for name in names)

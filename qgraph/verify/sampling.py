"""What ``--verify`` proves for the ``sampler`` pass (``meaning = "sampling"``).

The pass replaces ``logits`` by ``next_tokens``, so "same outputs" cannot
hold. What must hold: with greedy settings (temperature 0, no penalties,
empty buffers) the sampled graph returns the argmax of the logits the graph
before the pass computes, at every position, and every other output the two
share (the KV ``*_RetainedState``) is unchanged. Inputs are drawn per
example: token ids below the vocabulary, a prefill with left padding
(position -1), caches from a normal distribution; symbolic dims get small
sizes by their name (batch 1-3, seq 2-5, ctx 16). The statistical and
penalty properties are the pass's tests (tests/passes/test_sampler.py),
not something a drawn input can show.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.errors import PassFailure
from qgraph.verify.runner import OrtRunner

__all__ = ["check_greedy_sampler"]

_CTX = 16
_GREEDY = {"temperatures": 0.0, "top_ps": 1.0, "min_ps": 0.0, "repetition_penalties": 1.0, "presence_penalties": 0.0}


def _dims(value: ir.Value, sizes: dict[str, int]) -> tuple[int, ...]:
    out = []
    for dim in value.shape or ():
        if isinstance(dim, int):
            out.append(dim)
            continue
        name = str(dim).lower()
        key = next((k for k in ("ctx", "full_batch", "batch", "seq") if k in name), None)
        out.append(sizes[key] if key else 2)
    return tuple(out)


def _feeds(before: ir.Model, after: ir.Model, rng: np.random.Generator) -> tuple[dict, dict]:
    inputs = {v.name: v for v in before.graph.inputs}
    vocab = next(v for v in before.graph.outputs if v.name == "logits").shape[2]
    batch, seq = int(rng.integers(1, 4)), int(rng.integers(2, 6))
    sizes = {"ctx": _CTX, "full_batch": batch, "batch": batch, "seq": seq}
    feeds: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        shape = _dims(value, sizes)
        dtype = value.dtype.numpy()
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, shape).astype(dtype)
        elif name == "position_ids":
            pads = rng.integers(0, shape[1], shape[0])
            feeds[name] = np.array([[-1] * p + list(range(shape[1] - p)) for p in pads], dtype)
        elif name == "batch_index":
            feeds[name] = np.arange(shape[0], dtype=dtype).reshape(shape)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.normal(0, 1, shape).astype(dtype)
        else:  # an input the sampler does not read (num_logits_to_keep, comp_ctx_lengths: only shapes used)
            feeds[name] = np.zeros(shape, dtype)
    extra: dict[str, np.ndarray] = {}
    for value in after.graph.inputs:
        if value.name in inputs:
            continue
        shape = _dims(value, sizes)
        if value.name in _GREEDY:
            extra[value.name] = np.full(shape, _GREEDY[value.name], value.dtype.numpy())
        elif value.name == "last_accepted_output_tokens":
            extra[value.name] = feeds["input_ids"].astype(np.int64)
        elif value.name == "random_numbers":
            extra[value.name] = rng.uniform(0.01, 0.99, shape).astype(np.float32)
        elif value.name == "token_bitmasks":
            extra[value.name] = np.ones(shape, bool)
        else:  # top_ks (0: no top-k) and the penalty buffers (empty)
            extra[value.name] = np.zeros(shape, value.dtype.numpy())
    return feeds, extra


def check_greedy_sampler(before: ir.Model, after: ir.Model, *, examples: int = 5, seed: int | None = 0,
                         pass_name: str = "sampler") -> str:
    """Raise PassFailure unless greedy ``next_tokens`` = argmax(``logits``) and shared outputs are unchanged."""
    rng = np.random.default_rng(seed)
    with OrtRunner(before, label=f"the model before pass {pass_name!r}") as ref, \
            OrtRunner(after, label=f"the model after pass {pass_name!r}") as cand:
        for example in range(examples):
            feeds, extra = _feeds(before, after, rng)
            _compare(example, seed, pass_name, ref.run(feeds), cand.run({**feeds, **extra}))
    return f"greedy next_tokens = argmax of the logits, other outputs unchanged ({examples} drawn prefills, seed {seed})"


def _compare(example: int, seed: int | None, pass_name: str, want: dict, got: dict) -> None:
    greedy = want["logits"].argmax(axis=-1)
    if not np.array_equal(got["next_tokens"][..., 0], greedy):
        raise PassFailure(f"pass '{pass_name}': example {example} (seed {seed}): greedy next_tokens "
                          f"{got['next_tokens'][..., 0].tolist()} are not the argmax of the logits before the "
                          f"pass {greedy.tolist()}", pass_name=pass_name)
    for name in sorted(set(want) & set(got)):
        if not np.array_equal(want[name], got[name], equal_nan=True):
            raise PassFailure(f"pass '{pass_name}': example {example} (seed {seed}): output {name!r} changed",
                              pass_name=pass_name)

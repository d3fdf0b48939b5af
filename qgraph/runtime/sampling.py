"""Driving a graph that samples on the device (the ``sampler`` pass): feed its settings, carry its buffers.

Such a graph outputs ``next_tokens`` [B, S, 1] instead of ``logits``, so the
host does not sample: :class:`DeviceSamplingEngine` feeds each step the
sampler's inputs (QEfficient's names: ``temperatures``, ``top_ks``,
``top_ps``, ``min_ps``, ``repetition_penalties``, ``presence_penalties``,
``random_numbers`` drawn from the generation's seeded generator,
``last_accepted_output_tokens`` = the tokens fed), carries the retained
penalty buffers from one step's ``*_RetainedState`` outputs to the next
step's inputs, and returns token ids where the other engines return logits.

Two choices keep the graph's meaning (docs/sampler.md): the buffers start
empty for every generation, and a prefill chunk is never one column wide --
the graph tells prefill from decode by ``seq_len > positions``, so a
one-token prompt is fed with a padding column (position -1, which counts
nowhere) rather than being read as a decode step that would add the prompt
token to the presence buffer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.errors import BadInputError
from qgraph.runtime.engines import Engine, RetainedEngine
from qgraph.verify.kv_contract import detect_kv_layout

__all__ = ["DeviceSamplingEngine", "DevicePenalties", "is_sampler_graph", "sampler_layout"]

BUFFERS = ("past_repetition_penalty_buffer", "past_presence_penalty_buffer")
#: The inputs pass 'sampler' adds (QEfficient's names), and the outputs other than next_tokens.
SAMPLER_INPUTS = ("last_accepted_output_tokens", *BUFFERS, "repetition_penalties", "presence_penalties",
                  "temperatures", "top_ks", "top_ps", "min_ps", "random_numbers", "token_bitmasks")
_SAMPLER_OUTPUTS = {"probs", *(f"{b}_RetainedState" for b in BUFFERS)}


@dataclasses.dataclass(frozen=True)
class DevicePenalties:
    """Settings only the device sampler has (the host sampler has none of them)."""

    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output so far
    presence_penalty: float = 0.0  # > 0 discourages tokens already generated
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise BadInputError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise BadInputError(f"min-p must be in [0, 1], got {self.min_p}")


def is_sampler_graph(model: ir.Model) -> bool:
    return any(v.name == "next_tokens" for v in model.graph.outputs)


def sampler_layout(model: ir.Model, label: str):
    """The KV layout of a sampler graph, read as the plain retained graph it was made from.

    The sampler's inputs and buffer outputs are set aside while the contract
    is read, and ``next_tokens`` [B, S, 1] stands where ``logits`` [B, S, V]
    was; the graph is restored before returning.
    """
    graph = model.graph
    inputs, outputs = list(graph.inputs), list(graph.outputs)
    sampler_inputs = set(SAMPLER_INPUTS)
    tokens = next(v for v in outputs if v.name == "next_tokens")
    try:
        graph.inputs[:] = [v for v in inputs if v.name not in sampler_inputs]
        graph.outputs[:] = [v for v in outputs if v.name not in _SAMPLER_OUTPUTS]
        tokens.name = "logits"
        layout = detect_kv_layout(model, label=label)
    finally:
        tokens.name = "next_tokens"
        graph.inputs[:] = inputs
        graph.outputs[:] = outputs
    if layout.style != "retained":
        raise BadInputError(f"{label}: a sampler graph needs the retained-state cache, not {layout.style}")
    return layout


class DeviceSamplingEngine(RetainedEngine):
    """A retained-state graph with the sampler inside: prefill and decode return token ids [B], not logits."""

    kind = "retained KV cache, sampling on the device"
    samples_on_device = True

    def __init__(self, session: ort.InferenceSession, layout, *, vocab: int, max_top_k: int, **kwargs) -> None:
        super().__init__(session, layout, **kwargs)
        self.vocab = vocab
        self.max_top_k = max_top_k
        self.guided = "token_bitmasks" in {i.name for i in session.get_inputs()}
        self.penalties = DevicePenalties()
        self._buffers: dict[str, np.ndarray] = {}
        self._rng = np.random.default_rng()
        self._config = None

    def use_sampling(self, config, rng: np.random.Generator) -> None:
        """The generation's SamplingConfig (temperature 0 = greedy) and the generator its random numbers come from."""
        self._config, self._rng = config, rng

    def start(self, batch: int) -> None:
        Engine.start(self, batch)
        self._rows = None
        shape = (batch, self.n_kv_heads, self.ctx_len, self.head_dim)
        names = [name for pair in self.layout.past for name in pair]
        new = lambda: {n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.layout.cache_dtype))  # noqa: E731
                       for n in names}
        self._cache = new()
        self._spare = new() if self.binding_mode == "swap" else {}
        self._binding = b = self.session.io_binding()
        # Outputs come back in the order they were first bound (rebinding keeps the place): tokens, buffers, KV.
        b.bind_output("next_tokens", "cpu")
        for name in BUFFERS:
            b.bind_output(f"{name}_RetainedState", "cpu")
        if self.binding_mode == "alias":
            for (past_k, past_v), (ret_k, ret_v) in zip(self.layout.past, self.layout.present, strict=True):
                for past, ret in ((past_k, ret_k), (past_v, ret_v)):
                    b.bind_ortvalue_input(past, self._cache[past])
                    b.bind_ortvalue_output(ret, self._cache[past])
        # one buffer row per cache row: batch_size rows, or full_batch_size (= slots) under continuous batching
        self._buffers = {name: np.zeros((batch, self.vocab), bool) for name in BUFFERS}

    def _sampling_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """The per-row settings for a run of ``batch`` rows (1 when one slot is prefilled)."""
        config, p = self._config, self.penalties
        column = lambda x, dtype=np.float32: np.full((batch, 1), x, dtype)  # noqa: E731
        feeds = {
            "temperatures": column(config.temperature if config is not None else 0.0),
            "top_ks": column(config.top_k if config is not None and config.top_k else 0, np.int32),
            "top_ps": column(config.top_p if config is not None and config.top_p else 1.0),
            "min_ps": column(p.min_p), "repetition_penalties": column(p.repetition_penalty),
            "presence_penalties": column(p.presence_penalty),
        }
        uniform = self._rng.uniform(np.nextafter(0, 1), 1, (batch, self.max_top_k)).astype(np.float32)
        feeds["random_numbers"] = np.maximum(uniform, np.float32(np.nextafter(0, 1)))  # never 0 in float32
        if self.guided:  # no grammar here: every token allowed
            feeds["token_bitmasks"] = np.ones((batch, self.vocab), bool)
        return feeds

    def _run(self, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        tokens, positions = self._step_columns(tokens, valid)
        b = self._binding
        ids = np.ascontiguousarray(tokens, self.layout.ids_dtype)
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, self.layout.positions_dtype))
        b.bind_cpu_input("last_accepted_output_tokens", np.ascontiguousarray(tokens, np.int64))
        for name, value in {**self._serving_feeds(tokens.shape[0], positions),
                            **self._sampling_feeds(tokens.shape[0])}.items():
            b.bind_cpu_input(name, value)
        b.bind_output("next_tokens", "cpu")  # onnxruntime allocates these: their shapes change between runs
        for name, value in self._buffers.items():
            b.bind_cpu_input(name, value)
            b.bind_output(f"{name}_RetainedState", "cpu")
        if self.binding_mode == "swap":
            for (past_k, past_v), (ret_k, ret_v) in zip(self.layout.past, self.layout.present, strict=True):
                for past, ret in ((past_k, ret_k), (past_v, ret_v)):
                    b.bind_ortvalue_input(past, self._cache[past])
                    b.bind_ortvalue_output(ret, self._spare[past])
        self.session.run_with_iobinding(b)
        self.runs += 1
        if self.binding_mode == "swap":
            self._cache, self._spare = self._spare, self._cache
        outputs = b.get_outputs()
        for i, name in enumerate(BUFFERS, start=1):
            self._buffers[name] = outputs[i].numpy()
        return outputs[0].numpy()[..., 0]  # [B, S]

    def prefill(self, tokens: np.ndarray, valid: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Run the prompt in chunks of at least two columns; the token chosen after each row's last valid one."""
        tokens = np.asarray(tokens, np.int64)
        valid = np.asarray(valid, bool)
        if not valid.any(axis=1).all():
            raise BadInputError(f"prompt row(s) {np.flatnonzero(~valid.any(axis=1)).tolist()} have no tokens")
        length = tokens.shape[1]
        chunk = chunk or self.default_chunk or length
        last = length - 1 - np.argmax(valid[:, ::-1], axis=1)
        out = np.full(tokens.shape[0], -1, np.int64)
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            part, mask = tokens[:, start:stop], valid[:, start:stop]
            shift = 0
            if part.shape[1] == 1:  # one column reads as a decode step: add a padding column before it
                part = np.concatenate([np.zeros_like(part), part], axis=1)
                mask = np.concatenate([np.zeros_like(mask), mask], axis=1)
                shift = 1
            chosen = self._step(part, mask)  # [B, 1] (last-token logits) or [B, columns]
            for b in np.flatnonzero((last >= start) & (last < stop)):
                out[b] = chosen[b, 0] if chosen.shape[1] == 1 else chosen[b, last[b] - start + shift]
        return out

    def decode(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        return self._step(np.asarray(tokens, np.int64)[:, None], np.asarray(active, bool)[:, None])[:, 0]

    def penalty_buffers(self) -> dict[str, np.ndarray]:
        """The retained buffers after the last step (for tests): which tokens each row has seen."""
        return dict(self._buffers)

    def describe(self) -> str:
        return f"{super().describe()}, top-k window {self.max_top_k}"


def sampler_dims(model: ir.Model, label: str) -> dict[str, int]:
    """``vocab`` and ``max_top_k`` (the engine's keyword arguments) from the sampler's input shapes."""
    inputs = {v.name: v for v in model.graph.inputs}
    dims = {}
    for key, name in (("vocab", BUFFERS[0]), ("max_top_k", "random_numbers")):
        shape = inputs[name].shape if name in inputs else None
        if shape is None or shape.rank() != 2 or not isinstance(shape[1], int):
            raise BadInputError(f"{label}: the sampler input {name!r} needs a fixed second dim, has {shape}")
        dims[key] = shape[1]
    return dims

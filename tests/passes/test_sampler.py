"""The ``sampler`` pass against the numpy reference in ``sampler_reference``.

* greedy: temperature 0, or top-k 1, gives the argmax of the penalized
  (and scaled) logits, and the retained penalty buffers are the reference's
  seen-token sets -- a hypothesis property over drawn logits, penalties,
  prompts with padding, prefill and decode, 1 or K+1 positions, with and
  without ``batch_index``, with and without ``token_bitmasks``;
* ``probs`` (``return_pdfs``) is the reference distribution, drawn settings;
* the samples' distribution is the reference's (chi-square over many draws
  of ``random_numbers``), and the same test rejects a sampler that ignores
  the temperature;
* a graph the pass cannot sample from is refused, naming the pass and value.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qgraph.errors import PassFailure
from qgraph_passes.sampler import SamplerPass
from qgraph_passes.sampler import graph as sampler_graph

import sampler_reference as ref

ALPHA = 1e-6  # a correct sampler fails one chi-square assert with this probability (over seeds of the draw)
_SESSIONS: dict = {}


def _session(vocab: int, positions: int | None = 1, batch_index: bool = False, opset: int = 17,
             **options) -> ort.InferenceSession:
    key = (vocab, positions, batch_index, opset, tuple(sorted(options.items())))
    if key not in _SESSIONS:
        model = ir.from_proto(ref.logits_graph(vocab=vocab, positions=positions, batch_index=batch_index, opset=opset))
        SamplerPass(**options)(model)
        _SESSIONS[key] = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                              providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


@dataclasses.dataclass
class Step:
    """One run's inputs, in the reference's terms."""

    logits: np.ndarray  # [B, S, V] float32
    input_ids: np.ndarray  # [B, Sin]
    position_ids: np.ndarray  # [B, Sin], -1 padding
    last_accepted: np.ndarray  # [B, Sin]
    repetition: list[set[int]]  # per buffer row
    presence: list[set[int]]
    rows: list[int]  # buffer row of each batch row
    batch_index: bool
    rp: np.ndarray  # [B] repetition penalties
    pp: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    random: np.ndarray  # [B, max_top_k] in (0, 1)
    allowed: np.ndarray | None = None  # [B, V] token_bitmasks (guided decoding), None: the input is absent

    def feeds(self) -> dict[str, np.ndarray]:
        vocab = self.logits.shape[2]

        def buffer(sets: list[set[int]]) -> np.ndarray:
            out = np.zeros((len(sets), vocab), bool)
            for r, s in enumerate(sets):
                out[r, sorted(s)] = True
            return out

        column = lambda a, dtype=np.float32: np.asarray(a, dtype).reshape(-1, 1)  # noqa: E731
        feeds = {
            "input_ids": self.input_ids, "position_ids": self.position_ids, "logits_in": self.logits,
            "last_accepted_output_tokens": self.last_accepted,
            "past_repetition_penalty_buffer": buffer(self.repetition), "repetition_penalties": column(self.rp),
            "past_presence_penalty_buffer": buffer(self.presence), "presence_penalties": column(self.pp),
            "temperatures": column(self.temperature), "top_ks": column(self.top_k, np.int32),
            "top_ps": column(self.top_p), "min_ps": column(self.min_p), "random_numbers": self.random,
        }
        if self.batch_index:
            feeds["batch_index"] = column(self.rows, np.int64)
        if self.allowed is not None:
            feeds["token_bitmasks"] = self.allowed
        return feeds

    def reference_buffers(self) -> tuple[list[set[int]], list[set[int]]]:
        return ref.update_buffers(self.repetition, self.presence, input_ids=self.input_ids,
                                  position_ids=self.position_ids, last_accepted=self.last_accepted,
                                  n_logits=self.logits.shape[1], rows=self.rows)

    def reference_penalized(self) -> np.ndarray:
        repetition, presence = self.reference_buffers()
        logits = self.logits
        if self.allowed is not None:  # a disallowed token's logit is float16's lowest, then penalized as any other
            logits = np.where(self.allowed[:, None, :], logits, np.float32(np.finfo(np.float16).min))
        return np.stack([
            np.stack([ref.penalize(logits[b, s], repetition[row], presence[row], self.rp[b], self.pp[b])
                      for s in range(self.logits.shape[1])])
            for b, row in enumerate(self.rows)])


def _run(step: Step, **options) -> dict[str, np.ndarray]:
    options["include_guided_decoding"] = step.allowed is not None
    session = _session(step.logits.shape[2], batch_index=step.batch_index, positions=None, **options)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, step.feeds()), strict=True))


def f32(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats in [low, high] that float32 holds exactly (what the graph's float inputs see)."""
    return st.floats(low, high).map(lambda x: float(np.float32(x)))


finite = f32(-50, 50)
uniform = f32(1e-6, 1 - 1e-6)


@st.composite
def steps(draw, *, greedy: bool) -> tuple[Step, int]:
    vocab = draw(st.integers(2, 24))
    max_top_k = draw(st.integers(1, vocab))
    batch = draw(st.integers(1, 3))
    positions = draw(st.sampled_from([1, 3]))  # last-token logits, or K+1 = 3 of a speculative target
    prefill = draw(st.booleans())
    columns = positions + draw(st.integers(1, 4)) if prefill else positions
    cb = draw(st.booleans())
    buffer_rows = batch + draw(st.integers(0, 2)) if cb else batch
    rows = draw(st.permutations(range(buffer_rows)))[:batch] if cb else list(range(batch))
    ids = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=columns, max_size=columns),
                        min_size=batch, max_size=batch))
    accepted = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=columns, max_size=columns),
                             min_size=batch, max_size=batch))
    position_ids = []
    for _ in range(batch):  # left padding, then consecutive positions from a drawn start (0 = a new sequence)
        pad = draw(st.integers(0, columns - 1))
        start = draw(st.sampled_from([0, draw(st.integers(1, 20))]))
        position_ids.append([-1] * pad + list(range(start, start + columns - pad)))
    token_sets = st.lists(st.sets(st.integers(0, vocab - 1)), min_size=buffer_rows, max_size=buffer_rows)
    logits = draw(st.lists(finite, min_size=batch * positions * vocab, max_size=batch * positions * vocab))
    per_row = lambda s: np.array(draw(st.lists(s, min_size=batch, max_size=batch)))  # noqa: E731
    temperature = per_row(st.sampled_from([0.0, draw(f32(0.1, 4.0))]))
    top_k = per_row(st.integers(-1, max_top_k + 2))
    if greedy:  # temperature 0 or top-k 1 on every row
        top_k = np.where(temperature == 0, top_k, 1)
    allowed = None
    if draw(st.booleans()):  # guided decoding: at least one allowed token per row
        allowed = np.array(draw(st.lists(st.lists(st.booleans(), min_size=vocab, max_size=vocab),
                                         min_size=batch, max_size=batch)), bool)
        allowed[np.arange(batch), draw(st.lists(st.integers(0, vocab - 1), min_size=batch, max_size=batch))] = True
    step = Step(
        logits=np.array(logits, np.float32).reshape(batch, positions, vocab),
        input_ids=np.array(ids, np.int64), position_ids=np.array(position_ids, np.int64),
        last_accepted=np.array(accepted, np.int64), repetition=draw(token_sets), presence=draw(token_sets),
        rows=list(rows), batch_index=cb,
        rp=per_row(f32(0.5, 2.0)), pp=per_row(f32(-2.0, 2.0)),
        temperature=temperature, top_k=top_k, top_p=per_row(f32(0.05, 1.0)),
        min_p=per_row(f32(0.0, 1.0)),
        random=np.array(draw(st.lists(uniform, min_size=batch * max_top_k, max_size=batch * max_top_k)),
                        np.float32).reshape(batch, max_top_k),
        allowed=allowed,
    )
    return step, max_top_k


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=steps(greedy=True))
def test_temperature_0_or_top_k_1_gives_the_greedy_token_and_buffers_follow_the_tokens(drawn) -> None:
    step, max_top_k = drawn
    out = _run(step, max_top_k_ids=max_top_k)
    penalized = step.reference_penalized()
    t = step.temperature.astype(np.float32)[:, None, None]
    scaled = np.where(t == 0, penalized, penalized / np.where(t == 0, 1, t))
    expected = scaled.argmax(axis=2)
    assert out["next_tokens"].shape == (*expected.shape, 1)
    np.testing.assert_array_equal(out["next_tokens"][..., 0], expected)
    repetition, presence = step.reference_buffers()
    for name, sets in (("past_repetition_penalty_buffer", repetition), ("past_presence_penalty_buffer", presence)):
        got = out[f"{name}_RetainedState"]
        assert [set(np.flatnonzero(r).tolist()) for r in got] == sets, name


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(drawn=steps(greedy=False))
def test_probs_are_the_reference_distribution(drawn) -> None:
    step, max_top_k = drawn
    step.temperature = np.where(step.temperature == 0, 1.0, step.temperature).astype(np.float32)
    penalized = step.reference_penalized()
    expected, margins = [], []
    for b in range(penalized.shape[0]):
        for s in range(penalized.shape[1]):
            scaled = penalized[b, s] / np.float32(step.temperature[b])
            k = max_top_k if step.top_k[b] <= 0 or step.top_k[b] > max_top_k else step.top_k[b]
            window = np.sort(scaled)[::-1]
            assume(k == scaled.size or window[k - 1] != window[k])  # a tie at the k-th value: either token is right
            probs, margin = ref.distribution(scaled, top_k=int(step.top_k[b]), top_p=float(step.top_p[b]),
                                             min_p=float(step.min_p[b]), max_top_k=max_top_k)
            expected.append(probs)
            margins.append(margin)
    assume(min(margins) > 1e-4)  # float32 cannot decide a top-p / min-p boundary closer than this
    out = _run(step, max_top_k_ids=max_top_k, return_pdfs=True)
    got = out["probs"].reshape(-1, penalized.shape[2])
    np.testing.assert_allclose(got, np.array(expected), atol=2e-5, rtol=1e-4)


# --- the samples' distribution ------------------------------------------------------------------------------

DRAWS = 20_000
VOCAB = 12
LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.2, 0.0, -0.3, -0.5, -1.0, -2.0], np.float32)
CASES = {  # name: (temperature, top_k, top_p, min_p, repetition, presence, max_top_k)
    "temperature": (0.6, 0, 1.0, 0.0, 1.0, 0.0, 12),
    "top-k": (1.3, 5, 1.0, 0.0, 1.0, 0.0, 8),
    "top-p": (1.0, 0, 0.8, 0.0, 1.0, 0.0, 12),
    "min-p": (0.9, 10, 1.0, 0.2, 1.0, 0.0, 12),
    "penalties": (1.0, 0, 1.0, 0.0, 1.8, 0.9, 12),
}


def _sample_many(case: tuple, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts of the tokens drawn in DRAWS rows, the reference probabilities) for one decode step."""
    temperature, top_k, top_p, min_p, rp, pp, max_top_k = case
    rng = np.random.default_rng(seed)
    n = DRAWS
    seen = {0, 3, 7}  # the prompt and earlier output, for the repetition penalty ...
    accepted = 2  # ... and the token accepted last step (repetition and presence)
    step = Step(
        logits=np.broadcast_to(LOGITS, (n, 1, VOCAB)).copy(), input_ids=np.full((n, 1), accepted),
        position_ids=np.full((n, 1), 9), last_accepted=np.full((n, 1), accepted),
        repetition=[seen] * n, presence=[{7}] * n, rows=list(range(n)), batch_index=False,
        rp=np.full(n, rp), pp=np.full(n, pp), temperature=np.full(n, temperature), top_k=np.full(n, top_k),
        top_p=np.full(n, top_p), min_p=np.full(n, min_p),
        random=rng.uniform(np.nextafter(0, 1), 1, (n, max_top_k)).astype(np.float32),
    )
    tokens = _run(step, max_top_k_ids=max_top_k)["next_tokens"].reshape(-1)
    penalized = ref.penalize(LOGITS, seen | {accepted}, {7, accepted}, rp, pp)
    probs, margin = ref.distribution(penalized / np.float32(temperature), top_k=top_k, top_p=top_p, min_p=min_p,
                                     max_top_k=max_top_k)
    assert margin > 1e-3, "the case is too close to a top-p/min-p boundary to test"
    assert (probs[probs > 0] * n >= 5).all(), "expected counts below 5: the chi-square approximation does not hold"
    return np.bincount(tokens, minlength=VOCAB), probs


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_tokens_follow_the_reference_distribution(name: str) -> None:
    counts, probs = _sample_many(CASES[name], seed=list(CASES).index(name))
    assert counts[probs == 0].sum() == 0, f"tokens the reference never draws were drawn: {counts[probs == 0]}"
    p_value = ref.chi_square_p_value(counts, probs)
    assert p_value > ALPHA, (f"{name}: chi-square p = {p_value:.3g} <= {ALPHA} (a correct sampler fails here with "
                             f"probability {ALPHA}); counts {counts.tolist()}, expected {(probs * DRAWS).round(1).tolist()}")


def test_the_chi_square_rejects_a_sampler_that_ignores_the_temperature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistical test has power: with the temperature step removed from the graph, it fails."""
    monkeypatch.setattr(sampler_graph, "scale_by_temperature", lambda o, logits, greedy, t: logits)
    _SESSIONS.clear()
    try:
        counts, probs = _sample_many(CASES["temperature"], seed=0)
    finally:
        _SESSIONS.clear()
    assert ref.chi_square_p_value(counts, probs) < ALPHA


def test_the_chi_square_p_value_is_the_textbook_one() -> None:
    # chi2 quantiles: P(X >= 3.841 | 1 dof) = 0.05, P(X >= 18.307 | 10) = 0.05, P(X >= 23.209 | 10) = 0.01
    for statistic, dof, p in ((3.841, 1, 0.05), (18.307, 10, 0.05), (23.209, 10, 0.01)):
        q = ref._regularized_upper_gamma(dof / 2, statistic / 2)
        assert abs(q - p) < 2e-4, (statistic, dof, q)


@settings(max_examples=20, deadline=None)
@given(logits=st.lists(f32(-60000, 60000), min_size=2 * 20, max_size=2 * 20))
def test_float16_logits_at_opset_23_are_sampled_in_float32(logits) -> None:
    """A device graph's fp16 logits: greedy is the argmax of the same fp16 values, read as float32."""
    model = ir.from_proto(ref.logits_graph(vocab=20, opset=23, dtype=onnx.TensorProto.FLOAT16))
    SamplerPass(max_top_k_ids=5)(model)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    half = np.array(logits, np.float16).reshape(2, 1, 20)
    step = Step(logits=half, input_ids=np.zeros((2, 1), np.int64), position_ids=np.full((2, 1), 3),
                last_accepted=np.zeros((2, 1), np.int64), repetition=[set(), set()], presence=[set(), set()],
                rows=[0, 1], batch_index=False, rp=np.ones(2), pp=np.zeros(2), temperature=np.zeros(2),
                top_k=np.zeros(2), top_p=np.ones(2), min_p=np.zeros(2), random=np.full((2, 5), 0.5, np.float32))
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, step.feeds()), strict=True))
    np.testing.assert_array_equal(out["next_tokens"][:, 0, 0], half.astype(np.float32)[:, 0].argmax(axis=1))


# --- refusals ---------------------------------------------------------------------------------------------


def test_a_graph_without_logits_is_refused_naming_the_pass() -> None:
    model = ir.from_proto(ref.logits_graph(vocab=8))
    model.graph.outputs[0].name = "scores"
    with pytest.raises(PassFailure, match=r"pass 'sampler'.*no output 'logits'"):
        SamplerPass()(model)


def test_logits_of_the_wrong_rank_are_refused() -> None:
    model = ir.from_proto(ref.logits_graph(vocab=8))
    model.graph.outputs[0].shape = ir.Shape(["batch_size", 8])
    with pytest.raises(PassFailure, match=r"pass 'sampler'.*'logits' has shape"):
        SamplerPass()(model)


def test_a_graph_sampled_twice_is_refused() -> None:
    model = ir.from_proto(ref.logits_graph(vocab=8))
    SamplerPass(max_top_k_ids=4)(model)
    with pytest.raises(PassFailure, match=r"pass 'sampler'.*already outputs 'next_tokens'"):
        SamplerPass()(model)

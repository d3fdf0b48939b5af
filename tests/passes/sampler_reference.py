"""A numpy reference of on-device sampling, written from what each setting means.

Not a transcription of the graph: the buffers are Python sets of token ids,
top-p is "keep a token while the probability of the tokens above it is
below top_p", and the result of :func:`distribution` is the whole
probability vector the token is drawn from (float64), which the tests
compare with the graph's samples (chi-square) or its ``probs`` output.

Also here: the graph-free harness -- :func:`logits_graph`, a retained-state
shaped graph whose ``logits`` are an input, so a test can give the sampler
any logits -- and the chi-square p-value (no scipy in the environment).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as oh


def logits_graph(*, vocab: int, positions: int | None = 1, batch_index: bool = False, opset: int = 17,
                 dtype: int = T.FLOAT) -> onnx.ModelProto:
    """``input_ids``, ``position_ids`` [, ``batch_index``], ``logits_in`` -> ``logits`` = logits_in."""
    inputs = [oh.make_tensor_value_info("input_ids", T.INT64, ["batch_size", "seq_len"]),
              oh.make_tensor_value_info("position_ids", T.INT64, ["batch_size", "seq_len"])]
    if batch_index:
        inputs.append(oh.make_tensor_value_info("batch_index", T.INT64, ["batch_size", 1]))
    inputs.append(oh.make_tensor_value_info("logits_in", dtype, ["batch_size", positions or "positions", vocab]))
    out = oh.make_tensor_value_info("logits", dtype, ["batch_size", positions or "positions", vocab])
    graph = oh.make_graph([oh.make_node("Identity", ["logits_in"], ["logits"])], "logits", inputs, [out])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)


def update_buffers(repetition: list[set[int]], presence: list[set[int]], *, input_ids: np.ndarray,
                   position_ids: np.ndarray, last_accepted: np.ndarray, n_logits: int,
                   rows: list[int]) -> tuple[list[set[int]], list[set[int]]]:
    """The seen-token sets after one step: ``rows[b]`` is the buffer row of batch row b."""
    repetition = [set(s) for s in repetition]
    presence = [set(s) for s in presence]
    prefill = input_ids.shape[1] > n_logits
    for b, row in enumerate(rows):
        valid = position_ids[b] >= 0
        if prefill:
            if (position_ids[b] == 0).any():  # a new sequence starts in this row
                repetition[row] = set()
            repetition[row] |= {int(t) for t in input_ids[b][valid]}
            presence[row] = set()  # presence counts generated tokens only
        else:
            new = {int(t) for t in last_accepted[b][valid]}
            repetition[row] |= new
            presence[row] |= new
    return repetition, presence


def penalize(logits: np.ndarray, seen: set[int], generated: set[int], repetition: float, presence: float
             ) -> np.ndarray:
    """One position's logits [V] (float32) after the repetition and presence penalties."""
    out = np.array(logits, np.float32, copy=True)
    rp, pp = np.float32(repetition), np.float32(presence)
    for t in seen:
        out[t] = out[t] / rp if out[t] > 0 else out[t] * rp
    for t in generated:
        out[t] = out[t] - pp
    return out


def distribution(scaled: np.ndarray, *, top_k: int, top_p: float, min_p: float, max_top_k: int
                 ) -> tuple[np.ndarray, float]:
    """(probabilities [V] the token is drawn from, margin): ``scaled`` = penalized logits / temperature.

    ``margin`` is how far the drawn case lies from a top-p or min-p boundary
    (a test skips cases closer than float32 arithmetic can decide).
    """
    vocab = scaled.size
    k = max_top_k if top_k <= 0 or top_k > max_top_k else top_k
    order = np.argsort(-scaled.astype(np.float64), kind="stable")[:k]  # the k largest, largest first
    kept = scaled[order].astype(np.float64)
    p_k = np.exp(kept - kept.max())
    p_k /= p_k.sum()
    above = np.concatenate([[0.0], np.cumsum(p_k)[:-1]])  # probability of the tokens above each one
    keep = (above < top_p) | (np.arange(k) == 0)
    keep &= p_k >= min_p * p_k.max()
    margins = ([abs(above - top_p)[1:]] if top_p < 1 else []) + ([abs(p_k - min_p * p_k.max())] if min_p > 0 else [])
    margin = float(min((m.min() for m in margins if m.size), default=1.0))
    probs = np.zeros(vocab)
    chosen = order[keep]
    weights = np.exp(scaled[chosen].astype(np.float64) - scaled[chosen].max())
    probs[chosen] = weights / weights.sum()
    return probs, margin


def _regularized_upper_gamma(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a): a series below a + 1, a continued fraction above (Numerical Recipes)."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """P(chi2 >= observed) for counts drawn from ``probs`` (only tokens of nonzero probability are binned)."""
    support = probs > 0
    n = counts.sum()
    expected = n * probs[support]
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return _regularized_upper_gamma(dof / 2, statistic / 2)

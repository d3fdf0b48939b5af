"""GPTQ: block quantization that compensates each rounding error on the weights not yet rounded.

Round to nearest (``qgraph.quant_blocks.quantize_rtn``) rounds every weight on
its own. What matters is the layer's output ``X @ W`` on real inputs, and the
inputs' channels are correlated, so the error of rounding one row ``k`` of
``W`` [K, N] can be partly cancelled by moving the rows after it. GPTQ
(Frantar et al., 2022, "Optimal Brain Quantization" applied row by row) does
this greedily with the Hessian of the squared output error,
``H = 2 X^T X / T`` over ``T`` calibration rows of ``X``:

    for k = 0 .. K-1:  q_k = round(w_k);  e = (w_k - q_k) / U[k, k]
                       w_j -= U[k, j] * e  for every j > k

where ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``). The
update is applied lazily, one quantization block at a time (the block's rows
immediately, the rest with one matrix product when the block is done).

The layout is MatMulNBits' (blocks of ``block_size`` along K, one scale and
zero point per block and output column). A block's scale and zero point are
chosen when GPTQ reaches it, from the weights as the earlier blocks' errors
left them (GPTQ's "groups" with static order), with the same rule as round to
nearest (``block_parameters``), so the result is an ordinary
:class:`BlockQuantized`. Without correlation (diagonal ``H``) nothing is
propagated and the result is round to nearest exactly.

``damping`` (a fraction of the mean diagonal of ``H``) is added to the
diagonal so that ``H`` stays invertible when the calibration text has fewer
rows than ``K`` or a channel never varies. A channel the text never
exercises (zero diagonal) keeps its weight (GPTQ's reference zeroes it: the
calibration text does not see it, but a real input may).
"""

from __future__ import annotations

import numpy as np

from qgraph.quant_blocks import BlockQuantized, block_codes, block_parameters, check_layout

__all__ = ["hessian", "quantize_gptq"]


def hessian(activations: np.ndarray) -> np.ndarray:
    """``2 X^T X / T`` (float64) of the rows of ``activations`` [..., K] (every leading axis is a row)."""
    x = np.asarray(activations, np.float64).reshape(-1, activations.shape[-1])
    return 2.0 * (x.T @ x) / max(len(x), 1)


def _inverse_cholesky(h: np.ndarray, damping: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damping * mean(diag H) * I)^-1`` (float64)."""
    h = np.array(h, np.float64, copy=True)
    diagonal = np.diag(h).copy()
    dead = diagonal <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0  # an unexercised channel: no correlation to anything, rounded on its own
    live = diagonal[~dead]
    h[np.diag_indices_from(h)] += damping * (float(live.mean()) if live.size else 1.0)
    lower = np.linalg.cholesky(h)
    inverse_lower = np.linalg.solve(lower, np.eye(len(h)))  # L^-1: H^-1 = L^-T L^-1
    inverse = inverse_lower.T @ inverse_lower
    return np.linalg.cholesky(inverse).T


def quantize_gptq(weight: np.ndarray, h: np.ndarray, bits: int, block_size: int, *, symmetric: bool,
                  damping: float = 0.01) -> BlockQuantized:
    """GPTQ block quantization of a MatMul weight [K, N] (float16 or float32) given the Hessian ``h`` [K, K]
    of its input (:func:`hessian` of calibration activations)."""
    check_layout(bits, block_size)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    k, n = weight.shape
    if h.shape != (k, k):
        raise ValueError(f"the Hessian is {h.shape}, the weight has K = {k} rows")
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    upper = _inverse_cholesky(h, damping).astype(np.float32)
    w = np.array(weight, np.float32, copy=True)
    n_blocks = -(-k // block_size)
    codes = np.empty((n, n_blocks, block_size), np.uint8)
    scales = np.empty((n, n_blocks), weight.dtype)
    zeros = np.empty((n, n_blocks), np.float32)
    for b in range(n_blocks):
        start, end = b * block_size, min((b + 1) * block_size, k)
        rows = w[start:end]  # a view: the in-block updates land in w
        # The block's range as the earlier blocks' errors left it (padding rows are zero, as in RTN).
        scale, zero = block_parameters(rows.T, bits, symmetric=symmetric, dtype=weight.dtype)
        stored = scale.astype(np.float32)
        scales[:, b], zeros[:, b] = scale, zero
        errors = np.empty((end - start, n), np.float32)
        local = upper[start:end, start:end]
        for i in range(end - start):
            code = block_codes(rows[i], stored, zero, bits)
            codes[:, b, i] = code
            error = (rows[i] - (code.astype(np.float32) - zero) * stored) / local[i, i]
            rows[i + 1:] -= np.outer(local[i, i + 1:], error)
            errors[i] = error
        codes[:, b, end - start:] = zero.astype(np.uint8)[:, None]  # padding rows: code of 0.0
        if end < k:
            w[end:] -= upper[start:end, end:].T @ errors
    zero_points = None if symmetric else zeros.astype(np.uint8)
    return BlockQuantized(codes, scales, zero_points, bits, block_size, k)

"""Block-wise weight quantization and onnxruntime's ``MatMulNBits`` weight layout.

A MatMul weight ``W`` [K, N] is quantized along K in blocks of
``block_size`` (K padded with zeros to a whole number of blocks), one scale
(and, asymmetric, one zero point) per block and output column::

    W[k, n] ~ (code[n, k] - zero_point[n, k // block]) * scale[n, k // block]

Round to nearest (RTN): symmetric blocks have the implicit zero point
``2**(bits-1)`` (what MatMulNBits assumes when the zero-point input is
absent) and put the block's largest-magnitude weight ``e`` on code 0
(``scale = e / -2**(bits-1)``, of the opposite sign to ``e``), so all ``2**bits``
codes are used, as llama.cpp's Q4_0/Q8_0 and onnxruntime's own quantizer do:
``max|w| / (2**(bits-1) - 1)`` would leave one code unused, a 15-level grid
at 4 bits, with a coarser step for the same weights. Asymmetric blocks stretch
``[min(w, 0), max(w, 0)]`` over ``[0, 2**bits - 1]``. Codes are computed with the scale as
it is stored (the weight's dtype), so dequantizing the stored tensors gives
exactly the quantized weight.

Layout (com.microsoft::MatMulNBits, inputs B, scales, zero_points):
``B`` uint8 [N, n_blocks, block_size * bits / 8], 4-bit codes two to a byte,
the even element in the low nibble; ``scales`` [N, n_blocks] in the
weight's dtype; ``zero_points`` uint8 [N, ceil(n_blocks * bits / 8)], 4-bit
ones packed two to a byte the same way, row by row. Blocks may also carry an offset
added to every weight (GGUF's Q4_1, ``qgraph.gguf_blocks``), which
MatMulNBits has no input for: the quantize pass adds it beside. The same tensors (B
seen as [N, K * bits / 8]) are what ``com.microsoft::GatherBlockQuantized``
reads with ``quantize_axis=1``, so a tied embedding table shares them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "BITS", "BLOCK_SIZES", "BlockQuantized", "block_codes", "block_parameters", "check_layout", "concatenate_columns",
    "pack_codes", "quantize_rtn", "unpack_codes", "unpack_matmul_nbits",
]

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A quantized [K, N] weight: codes [N, n_blocks, block_size], scales and zero points [N, n_blocks]."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None  # None: symmetric, the implicit 2**(bits-1)
    bits: int
    block_size: int
    k: int
    #: [N, n_blocks] added to every weight of a block (GGUF's Q4_1 minimum ``m``), or None. MatMulNBits
    #: has no such input: the quantize pass adds ``blocksum(A) @ offsets`` beside it.
    offsets: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> np.ndarray:
        """The weight these blocks stand for, [K, N] in the scales' dtype."""
        zero = (np.float32(2 ** (self.bits - 1)) if self.zero_points is None
                else self.zero_points.astype(np.float32)[..., None])
        blocks = (self.codes.astype(np.float32) - zero) * self.scales.astype(np.float32)[..., None]
        if self.offsets is not None:
            blocks = blocks + self.offsets.astype(np.float32)[..., None]
        return blocks.reshape(self.n, -1)[:, : self.k].T.astype(self.scales.dtype)

    def matmul_nbits_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(B, scales, zero_points) as MatMulNBits takes them."""
        b = pack_codes(self.codes.reshape(self.n * self.n_blocks, -1), self.bits).reshape(self.n, self.n_blocks, -1)
        zero_points = None
        if self.zero_points is not None:
            zero_points = pack_codes(self.zero_points, self.bits)
        return b, self.scales, zero_points

    def attributes(self) -> dict[str, int]:
        return {"K": self.k, "N": self.n, "bits": self.bits, "block_size": self.block_size}


def concatenate_columns(parts: list[BlockQuantized]) -> BlockQuantized:
    """The blocks of ``[W0 | W1 | ...]`` (weights [K, N_i] side by side) from the blocks of each part.

    Blocks run along K within one output column, so a column's codes, scale,
    zero point and offset do not depend on its neighbours: the packed weight's
    blocks are the parts' blocks one after another along N, and they
    dequantize to the parts' weights side by side, bit for bit. The parts must
    share K, bits, block size and kind of block (zero points or not, offsets
    or not); otherwise the packed weight has no single MatMulNBits layout.

    Raises:
        ValueError: no parts, or parts whose layouts differ (the message names the first that differs).
    """
    if not parts:
        raise ValueError("no blocks to concatenate")

    def layout(q: BlockQuantized) -> tuple:
        return (q.k, q.bits, q.block_size, q.zero_points is not None, q.offsets is not None, q.scales.dtype)

    first = layout(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if layout(part) != first:
            names = ("K", "bits", "block_size", "zero points", "offsets", "scale dtype")
            diff = next(f"{name} {a} vs {b}" for name, a, b in zip(names, first, layout(part)) if a != b)
            raise ValueError(f"part {i} has another block layout than part 0 ({diff})")

    def joined(field: str) -> np.ndarray | None:
        arrays = [getattr(q, field) for q in parts]
        return None if arrays[0] is None else np.concatenate(arrays, axis=0)

    q = parts[0]
    return BlockQuantized(joined("codes"), joined("scales"), joined("zero_points"), q.bits, q.block_size, q.k,
                          offsets=joined("offsets"))


def check_layout(bits: int, block_size: int) -> None:
    """Refuse a bit width or block size MatMulNBits has no layout for."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 of at least 16, got {block_size}")


def quantize_rtn(weight: np.ndarray, bits: int, block_size: int, *, symmetric: bool) -> BlockQuantized:
    """Round-to-nearest block quantization of a MatMul weight [K, N] (float16 or float32)."""
    check_layout(bits, block_size)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), np.float32)
    padded[:, :k] = weight.T
    blocks = padded.reshape(n, n_blocks, block_size)
    scale, zero = block_parameters(blocks, bits, symmetric=symmetric, dtype=weight.dtype)
    codes = block_codes(blocks, scale.astype(np.float32)[..., None], zero[..., None], bits)
    zero_points = None if symmetric else zero.astype(np.uint8)
    return BlockQuantized(codes, scale, zero_points, bits, block_size, k)


def block_parameters(blocks: np.ndarray, bits: int, *, symmetric: bool, dtype: np.dtype
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(scale in ``dtype``, zero point as float32) of each block, the values along the last axis of ``blocks``.

    Shared by every method that picks a block's range from its values (round to
    nearest, and GPTQ when it reaches a block), so they store the same kind of block.
    """
    top = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        largest = np.abs(blocks).argmax(axis=-1)[..., None]
        scale = np.take_along_axis(blocks, largest, axis=-1)[..., 0] / -half  # that weight -> code 0
        zero = np.full(scale.shape, half, np.float32)
    else:
        low = np.minimum(blocks.min(axis=-1), 0.0)
        high = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (high - low) / top
    scale = np.where(scale != 0, scale, 1.0).astype(dtype)  # an all-zero block: any scale is exact
    if not symmetric:
        zero = np.clip(np.rint(-low / scale.astype(np.float32)), 0, top).astype(np.float32)
    return scale, zero


def block_codes(values: np.ndarray, stored_scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Codes of ``values`` (round to nearest) under a scale as stored (float32 of it) and a zero point; they
    broadcast against each other."""
    return np.clip(np.rint(values / stored_scale) + zero, 0, 2**bits - 1).astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``codes`` (uint8, values < 2**bits) into bytes: 4-bit pairs low nibble first."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes.copy()
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`: the first ``count`` codes of each row of the last axis."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count]


def unpack_matmul_nbits(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int, n: int, bits: int, block_size: int
) -> BlockQuantized:
    """Read MatMulNBits initializers back into codes, scales and zero points."""
    n_blocks = -(-k // block_size)
    codes = unpack_codes(b.reshape(n * n_blocks, -1), bits, block_size).reshape(n, n_blocks, block_size)
    zeros = None
    if zero_points is not None:
        zeros = unpack_codes(zero_points.reshape(n, -1), bits, n_blocks)
    return BlockQuantized(codes, scales.reshape(n, n_blocks), zeros, bits, block_size, k)

"""A GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as MatMulNBits blocks, taken as they are.

llama.cpp stores a weight [N, K] (ne0 = K, contiguous) as rows of 32-weight
blocks along K, which is exactly MatMulNBits' blocking (blocks of
``block_size`` along K, one scale per block and output column), so the
blocks can be kept instead of being dequantized to float32 and quantized
again. Per block of 32 codes ``q``:

==========  ==================================  ==================================================
GGUF type   llama.cpp's weight                  MatMulNBits (``(code - zero_point) * scale``)
==========  ==================================  ==================================================
Q4_0        ``d * (q - 8)``, q in 0..15          bits 4, scale d, no zero points (implicit 8)
Q4_1        ``d * q + m``, q in 0..15            bits 4, scale d, zero points 0, plus offset m
Q8_0        ``d * q``, q in -128..127 (int8)     bits 8, codes ``q + 128``, scale d, implicit 128
==========  ==================================  ==================================================

``d`` and ``m`` are float16 in the file and exact in float32; codes, scales
and offsets are the file's bits. Q4_1's ``m`` is not a whole number of
steps, so it is not a zero point: a float zero point ``-m/d`` would be
allowed by onnxruntime but sends MatMulNBits to a path that dequantizes
the whole weight on every call (about 1000x slower here). It is kept as a
per-block offset instead (``BlockQuantized.offsets``), which the quantize
pass adds as ``(A @ block_sums) @ m`` beside the MatMulNBits -- two small
float MatMuls, 1/32 of the weight's size. In a block of 32, GGUF puts the first 16
weights in the low nibbles and the last 16 in the high nibbles; MatMulNBits
pairs neighbours, so codes are unpacked here and packed again by
:mod:`qgraph.quant_blocks`.

Which GGUF tensor a graph weight came from is found by value, not by name:
:class:`GgufWeights` dequantizes each kept tensor with the gguf package (the
function transformers' GGUF loader uses, so the exported float graph holds
exactly those values) and matches rows. A row permutation is allowed, since
transformers reorders the rows of Llama's q/k projections on load (llama.cpp
stores them in its RoPE order); a weight is only taken when every row is
bit-identical to a permuted GGUF row, so the blocks placed stand for exactly
the float weight they replace. A weight packed from sibling projections
(Q/K/V, gate/up) is several GGUF tensors side by side along N
(:meth:`GgufWeights.find_side_by_side`); MatMulNBits blocks run along K per
output column, so their blocks concatenate along N
(:func:`qgraph.quant_blocks.concatenate_columns`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from qgraph.errors import BadInputError
from qgraph.quant_blocks import BlockQuantized

__all__ = ["GGUF_BLOCK", "KEPT_TYPES", "GgufMatch", "GgufWeights", "blocks_from_gguf"]

GGUF_BLOCK = 32
#: GGUF quantization types kept as blocks -> MatMulNBits bits.
KEPT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
_BLOCK_BYTES = {"Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16, "Q8_0": 2 + 32}


def blocks_from_gguf(raw: np.ndarray, qtype: str, k: int, dtype: type = np.float32) -> BlockQuantized:
    """The blocks of a GGUF tensor's raw rows (uint8 [N, K / 32 * block bytes]) as MatMulNBits blocks.

    ``dtype``: of the scales (and Q4_1's zero points): the graph's float type.
    """
    if qtype not in KEPT_TYPES:
        raise ValueError(f"GGUF type {qtype} is not kept as blocks (kept: {', '.join(KEPT_TYPES)})")
    if k % GGUF_BLOCK:
        raise ValueError(f"K={k} is not a whole number of GGUF blocks of {GGUF_BLOCK}")
    n_blocks = k // GGUF_BLOCK
    raw = np.ascontiguousarray(raw, np.uint8)
    if raw.ndim != 2 or raw.shape[1] != n_blocks * _BLOCK_BYTES[qtype]:
        raise ValueError(f"{qtype} rows of K={k} take {n_blocks * _BLOCK_BYTES[qtype]} bytes, got shape {raw.shape}")
    blocks = raw.reshape(raw.shape[0], n_blocks, _BLOCK_BYTES[qtype])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q8_0":
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockQuantized(codes, d.astype(dtype), None, 8, GGUF_BLOCK, k)
    packed = blocks[..., 2:] if qtype == "Q4_0" else blocks[..., 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # weights 0..15 low, 16..31 high
    if qtype == "Q4_0":
        return BlockQuantized(codes, d.astype(dtype), None, 4, GGUF_BLOCK, k)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    zero = np.zeros(d.shape, np.uint8)  # whole codes: onnxruntime's prepacked kernel takes them
    return BlockQuantized(codes, d.astype(dtype), zero, 4, GGUF_BLOCK, k, offsets=m.astype(dtype))


@dataclasses.dataclass(frozen=True)
class GgufMatch:
    """The GGUF tensor a float weight is, and its blocks in the weight's row order."""

    name: str
    qtype: str
    blocks: BlockQuantized


#: Columns a row fingerprint reads: enough to tell trained rows apart; a collision can only cost a
#: match (every match is checked bit for bit), never place a wrong block.
_HASHED_COLUMNS = 64


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint of each float32 row's first bits (candidates only: matches are checked exactly)."""
    bits = np.ascontiguousarray(rows[:, :_HASHED_COLUMNS], np.float32).view(np.uint32)
    weights = np.random.default_rng(0x6767).integers(1, 2**63, bits.shape[1], dtype=np.uint64) | np.uint64(1)
    out = np.empty(bits.shape[0], np.uint64)
    for start in range(0, bits.shape[0], 4096):  # bounded temporaries for a 49k-row embedding
        chunk = bits[start:start + 4096].astype(np.uint64)
        with np.errstate(over="ignore"):
            out[start:start + 4096] = ((chunk + np.uint64(0x9E3779B9)) * weights).sum(axis=1, dtype=np.uint64)
    return out


class GgufWeights:
    """The Q4_0 / Q4_1 / Q8_0 tensors of one GGUF file, looked up by the float weight they dequantize to.

    Raises:
        BadInputError: the file is missing, not GGUF, unreadable, or the gguf package is not installed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            import gguf
        except ImportError:
            raise BadInputError(f"{self.path}: reading GGUF blocks needs the gguf package "
                                "(`pip install gguf`)") from None
        self._gguf = gguf
        if not self.path.is_file():
            raise BadInputError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise BadInputError(f"{self.path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        try:
            reader = gguf.GGUFReader(self.path)
            tensors = list(reader.tensors)
        except Exception as error:  # noqa: BLE001 - the reader raises ValueError, struct.error, IndexError...
            raise BadInputError(f"{self.path}: not a readable GGUF file ({type(error).__name__}: {error})") from None
        self._tensors = {t.name: t for t in tensors if t.tensor_type.name in KEPT_TYPES and len(t.shape) == 2}
        #: GGUF tensors of other types (F32, F16, K-quants...): not kept as blocks
        self.other_types = {t.name: t.tensor_type.name for t in tensors
                            if t.name not in self._tensors and len(t.shape) == 2}
        self._rows: dict[int, list[tuple[str, int]]] = {}  # row fingerprint -> (tensor, row)
        for name in self._tensors:
            for row, digest in enumerate(_row_hashes(self._dequantized(name)).tolist()):
                self._rows.setdefault(digest, []).append((name, row))

    def __len__(self) -> int:
        return len(self._tensors)

    def _dequantized(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        n, k = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists ne0 (K) first
        try:
            return self._gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(n, k)
        except ValueError as error:
            raise BadInputError(f"{self.path}: tensor '{name}' ({tensor.tensor_type.name}) is corrupt "
                                f"({error})") from None

    def find(self, weight: np.ndarray) -> GgufMatch | None:
        """The GGUF tensor whose dequantized rows are exactly ``weight``'s rows ([N, K], float32), or None."""
        if weight.dtype != np.float32 or weight.ndim != 2:
            return None
        hashes = _row_hashes(weight).tolist()
        for name in dict.fromkeys(name for name, _ in self._rows.get(hashes[0], ())):
            match = self._match(name, weight, hashes)
            if match is not None:
                return match
        return None

    def find_side_by_side(self, weight: np.ndarray) -> list[GgufMatch] | None:
        """GGUF tensors whose rows, one tensor after the other, are exactly ``weight``'s rows ([N, K]), or None.

        A weight packed from sibling projections and saved (its parts no
        longer known) is such a run: its first N0 rows are one tensor (rows
        possibly permuted), the next N1 another, and so on. Each run is
        found from its first row's fingerprint and taken whole only when
        bit-identical, so a wrong split cannot be placed.
        """
        if weight.dtype != np.float32 or weight.ndim != 2 or not weight.shape[0]:
            return None
        hashes = _row_hashes(weight).tolist()
        matches, start = [], 0
        while start < weight.shape[0]:
            match = None
            for name in dict.fromkeys(name for name, _ in self._rows.get(hashes[start], ())):
                stop = start + int(self._tensors[name].shape[1])  # the tensor's N (GGUF lists K first)
                if stop <= weight.shape[0]:
                    match = self._match(name, weight[start:stop], hashes[start:stop])
                if match is not None:
                    break
            if match is None:
                return None
            matches.append(match)
            start += match.blocks.n
        return matches

    def _match(self, name: str, weight: np.ndarray, hashes: list[int]) -> GgufMatch | None:
        """Tensor ``name`` as ``weight`` ([N, K], row fingerprints ``hashes``) if every row is bit-identical to a
        distinct row of it, else None."""
        perm = self._permutation(name, hashes)
        if perm is None:
            return None
        values = self._dequantized(name)
        if values.shape != weight.shape:
            return None
        if not np.array_equal(values[perm].view(np.uint32), np.ascontiguousarray(weight).view(np.uint32)):
            return None
        tensor = self._tensors[name]
        qtype = tensor.tensor_type.name
        blocks = blocks_from_gguf(np.asarray(tensor.data).reshape(values.shape[0], -1), qtype, weight.shape[1])
        return GgufMatch(name, qtype, _rows_taken(blocks, perm))

    def _permutation(self, name: str, hashes: list[int]) -> np.ndarray | None:
        """For each row of the weight, a distinct row of tensor ``name`` with the same fingerprint."""
        free: dict[int, list[int]] = {}
        for digest in set(hashes):
            free[digest] = [row for other, row in self._rows.get(digest, ()) if other == name]
        perm = np.empty(len(hashes), np.int64)
        for i, digest in enumerate(hashes):
            if not free[digest]:
                return None
            perm[i] = free[digest].pop(0)
        return perm


def _rows_taken(blocks: BlockQuantized, perm: np.ndarray) -> BlockQuantized:
    zero = None if blocks.zero_points is None else blocks.zero_points[perm]
    offsets = None if blocks.offsets is None else blocks.offsets[perm]
    return dataclasses.replace(blocks, codes=blocks.codes[perm], scales=blocks.scales[perm], zero_points=zero,
                               offsets=offsets)

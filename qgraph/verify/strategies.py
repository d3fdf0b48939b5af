"""Hypothesis strategies that draw inputs a model accepts.

One drawn :class:`Example` is a complete feed for a graph: every symbolic dim
gets a concrete size (a dim name shared by several inputs is drawn once, so
shapes agree; unnamed dims are drawn one by one), and every input gets values
fitting its role (:mod:`qgraph.verify.roles`):

* token ids: uniform below the vocab size read from the embedding table;
* attention masks: 1 for valid tokens, 0 for padding (also for bool and
  float masks; give a strategy for an additive 0/-inf mask), padding on the
  left or the right (one side per example, as a tokenizer pads a batch), at
  least one valid token per row, along the last axis;
* position ids: when the model also takes a 2-D attention mask covering the
  positions, they follow Hugging Face's rule ``cumsum(mask) - 1`` with
  padding positions set to 1 (``masked_fill_(mask == 0, 1)``), taken over
  the last ``seq`` columns of the mask; without a mask they count 0, 1, ...
  over the valid tokens and mark padding with -1, qgraph's retained-state
  convention (docs/design.md, KV-cache I/O contracts);
* floats: an order of magnitude ``10**k`` is drawn per input (k in
  ``float_exponents``, shrinking towards 1) and the elements within it, so
  bugs that only show at small magnitudes (an epsilon) or large ones
  (overflow) are reachable; ``large_magnitudes`` widens the range up to the
  dtype's finite maximum for fp16 work; ``spread_magnitudes`` instead draws
  every element's magnitude log-uniformly over the whole range
  (:func:`spread_float_arrays`), so one array visits every decade -- what
  the rule self-check uses, where a difference confined to one band of
  inputs (an approximation of GELU) must show in a few examples;
* other integers: a small range; bools: anything.

Everything is drawn through hypothesis, so failures shrink: sizes towards
the low end of their range, padding towards none, magnitudes towards 1.
Array values are dense uniform noise from a seed hypothesis draws, with the
elements hypothesis chooses to set explicitly written on top
(``hypothesis.extra.numpy.arrays`` with a sentinel fill); those explicit
elements shrink away, towards pure noise. Drawing every element through
hypothesis instead costs ~20 ms per example for a few hundred elements,
makes shrinking take minutes, misaligns when a dim shrinks (so shapes stop
shrinking), and hypothesis' deliberately skewed element distribution (many
zeros, repeated values) leaves arrays near constant, which hides bugs such
as a softmax over the wrong axis or a cache write one slot late.

Any input's strategy can be replaced by name: a SearchStrategy of arrays, a
callable taking the input's concrete shape and returning one, or a fixed
array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import ml_dtypes
import numpy as np
import onnx_ir as ir
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qgraph.verify.kv_contract import MASKS_KEY
from qgraph.verify.roles import InputSpec, Role, describe_inputs, dim_symbols

__all__ = [
    "Example",
    "InputOptions",
    "InputOverride",
    "attention_masks",
    "float_arrays",
    "input_strategy",
    "position_ids",
    "positions_from_mask",
    "spread_float_arrays",
    "token_ids",
]

Padding = Literal["left", "right", "both", "none"]
InputOverride: TypeAlias = (
    "st.SearchStrategy[np.ndarray] | Callable[[tuple[int, ...]], st.SearchStrategy[np.ndarray]] | np.ndarray"
)
DimOverride: TypeAlias = "int | tuple[int, int] | st.SearchStrategy[int]"

_SEED = st.integers(0, 2**32 - 1)


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """How inputs are drawn; every field has a default that suits test-sized models.

    dims: size (or (low, high) range, or strategy) per dim name; a key may
        also be a whole dim expression such as ``"past + seq"``.
    dim_range: inclusive range for symbolic dims not in ``dims``.
    vocab_size: force the token-id bound instead of reading the table.
    fallback_vocab_size: bound when an id input feeds no embedding table.
    padding: which side masks pad on; "both" draws a side per example.
    float_exponents: inclusive range of k in the magnitude ``10**k``.
    large_magnitudes: widen magnitudes up to the float dtype's maximum.
    spread_magnitudes: draw each element's magnitude log-uniformly over
        ``float_exponents`` instead of one magnitude per input.
    int_range: inclusive range of other integer inputs.
    """

    dims: Mapping[str, DimOverride] = dataclasses.field(default_factory=dict)
    dim_range: tuple[int, int] = (1, 6)
    vocab_size: int | None = None
    fallback_vocab_size: int = 32
    padding: Padding = "both"
    float_exponents: tuple[int, int] = (-3, 2)
    large_magnitudes: bool = False
    spread_magnitudes: bool = False
    int_range: tuple[int, int] = (0, 3)


@dataclasses.dataclass
class Example:
    """One drawn feed: arrays by input name, and the sizes chosen for dim names."""

    feeds: dict[str, np.ndarray]
    dims: dict[str, int]
    padding: str | None = None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(d) for d in a.shape) for name, a in self.feeds.items()}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}{list(s)}" for n, s in self.shapes.items())
        return f"Example(dims={self.dims}, padding={self.padding}, shapes: {shapes})"


# --- building blocks, usable on their own as overrides ---------------------


def _numpy_dtype(dtype: ir.DataType | np.dtype | type) -> np.dtype:
    if isinstance(dtype, ir.DataType):
        return np.dtype(dtype.numpy())
    return np.dtype(dtype)


def _finite_max(dtype: np.dtype) -> float:
    return float(ml_dtypes.finfo(dtype).max)


def _with_chosen_elements(draw: st.DrawFn, noise: np.ndarray, bound: float, dtype: np.dtype, scale: float = 1.0) -> np.ndarray:
    """``noise`` with the elements hypothesis chooses (in ``[-bound, bound]``) written over it, scaled and clipped.

    The chosen elements are what shrinking removes, so a failing array
    shrinks towards pure noise (see the module docstring).
    """
    chosen = draw(
        hnp.arrays(np.float32, noise.shape, elements=st.floats(-bound, bound, width=32),
                   fill=st.just(np.float32(np.nan)))
    )
    unit = np.where(np.isnan(chosen), noise, chosen)
    limit = _finite_max(dtype)
    return np.clip(unit.astype(np.float64) * scale, -limit, limit).astype(dtype)


@st.composite
def float_arrays(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    dtype: ir.DataType | np.dtype | type = np.float32,
    *,
    exponents: tuple[int, int] = (-3, 2),
) -> np.ndarray:
    """Floats of magnitude ``10**k`` (k drawn in ``exponents``), clipped to the dtype's range.

    Dense uniform noise from a drawn seed, with the elements hypothesis
    chooses to set (zeros, +-1, tiny values, ...) written over it.
    """
    scale = 10.0 ** draw(st.integers(*exponents))
    noise = np.random.default_rng(draw(_SEED)).uniform(-1.0, 1.0, shape).astype(np.float32)
    return _with_chosen_elements(draw, noise, 1.0, _numpy_dtype(dtype), scale)


@st.composite
def spread_float_arrays(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    dtype: ir.DataType | np.dtype | type = np.float32,
    *,
    exponents: tuple[int, int] = (-3, 2),
) -> np.ndarray:
    """Floats whose magnitudes spread over every decade ``10**low .. 10**high``, both signs.

    Each element is ``sign * 10**u`` with ``u`` uniform in ``exponents``, from
    a drawn seed: an array of n elements puts about n / (high - low) of them
    in each decade, so a behaviour confined to one band of inputs is met in
    almost every example (64 elements over 5 decades miss a given decade with
    probability 0.8**64 < 1e-6). Elements hypothesis chooses to set are
    written on top, as in :func:`float_arrays`, and shrink away.
    """
    rng = np.random.default_rng(draw(_SEED))
    low, high = exponents
    magnitudes = 10.0 ** rng.uniform(low, high, shape)
    noise = np.where(rng.random(shape) < 0.5, -magnitudes, magnitudes)
    return _with_chosen_elements(draw, noise, 2.0, _numpy_dtype(dtype))


@st.composite
def _ints_in_range(draw: st.DrawFn, shape: tuple[int, ...], dtype: np.dtype, low: int, high: int) -> np.ndarray:
    """Uniform integers in [low, high] from a drawn seed, with hypothesis-chosen elements on top."""
    noise = np.random.default_rng(draw(_SEED)).integers(low, high + 1, size=shape)
    sentinel = low - 1
    chosen = draw(hnp.arrays(np.int64, shape, elements=st.integers(low, high), fill=st.just(sentinel)))
    return np.where(chosen == sentinel, noise, chosen).astype(dtype)


def token_ids(
    shape: tuple[int, ...], vocab_size: int, dtype: ir.DataType | np.dtype | type = np.int64
) -> st.SearchStrategy[np.ndarray]:
    """Token ids uniform in [0, vocab_size)."""
    return _ints_in_range(shape, _numpy_dtype(dtype), 0, vocab_size - 1)


def _rows_and_length(shape: tuple[int, ...]) -> tuple[int, int]:
    """Treat the last axis as the sequence and everything before it as rows."""
    if not shape:
        return 1, 1
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


@st.composite
def _pad_counts(draw: st.DrawFn, rows: int, length: int) -> np.ndarray:
    """Padding tokens per row, leaving at least one valid token; shrinks to no padding."""
    if length <= 1 or rows == 0:
        return np.zeros(rows, dtype=np.int64)
    return draw(hnp.arrays(np.int64, (rows,), elements=st.integers(0, length - 1), fill=st.nothing()))


def _valid_from_pads(pads: np.ndarray, length: int, side: str) -> np.ndarray:
    """A (rows, length) boolean array: True where the token is real."""
    cols = np.arange(length)[None, :]
    if side == "left":
        return cols >= pads[:, None]
    return cols < (length - pads)[:, None]


def _cast_mask(valid: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return valid.reshape(shape).astype(dtype)


@st.composite
def attention_masks(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    dtype: ir.DataType | np.dtype | type = np.int64,
    *,
    side: Literal["left", "right"] = "right",
) -> np.ndarray:
    """1/0 masks along the last axis with padding on ``side``, >= 1 valid token a row."""
    rows, length = _rows_and_length(shape)
    pads = draw(_pad_counts(rows, length))
    return _cast_mask(_valid_from_pads(pads, length, side), shape, _numpy_dtype(dtype))


def positions_from_mask(mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Hugging Face's position ids for the last ``seq_len`` columns of a 2-D mask.

    ``cumsum(mask) - 1`` with padding positions set to 1, as
    ``LlamaForCausalLM.prepare_inputs_for_generation`` does.
    """
    m = mask.astype(np.int64)
    pos = np.cumsum(m, axis=-1) - 1
    pos = np.where(m == 0, 1, pos)
    return pos[..., mask.shape[-1] - seq_len :]


@st.composite
def position_ids(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    dtype: ir.DataType | np.dtype | type = np.int64,
    *,
    side: Literal["left", "right"] = "right",
    pad_value: int = -1,
) -> np.ndarray:
    """Positions 0, 1, ... over the valid tokens of each row, ``pad_value`` on padding."""
    rows, length = _rows_and_length(shape)
    pads = draw(_pad_counts(rows, length))
    valid = _valid_from_pads(pads, length, side)
    pos = np.cumsum(valid, axis=-1) - 1
    pos = np.where(valid, pos, pad_value)
    return pos.reshape(shape).astype(_numpy_dtype(dtype))


# --- whole-model feeds ------------------------------------------------------


def _dim_strategy(override: DimOverride) -> st.SearchStrategy[int]:
    if isinstance(override, int):
        return st.just(override)
    if isinstance(override, tuple):
        return st.integers(*override)
    return override


def _draw_dim_sizes(draw: st.DrawFn, specs: Sequence[InputSpec], options: InputOptions) -> dict[str, int]:
    """One size per dim name across all inputs; expressions are evaluated, not drawn."""
    plain: list[str] = []
    expressions: list[str] = []
    for spec in specs:
        for dim in spec.dims or ():
            if not isinstance(dim, str):
                continue
            if dim in options.dims:
                if dim not in plain:
                    plain.append(dim)
                continue
            names, is_expr = dim_symbols(dim)
            if is_expr and dim not in expressions:
                expressions.append(dim)
            for name in sorted(names):
                if name not in plain:
                    plain.append(name)
    sizes: dict[str, int] = {}
    for name in plain:
        override = options.dims.get(name)
        strategy = _dim_strategy(override) if override is not None else st.integers(*options.dim_range)
        sizes[name] = draw(strategy)
    for expr in expressions:
        value = ir.SymbolicDim(expr).evaluate(sizes)
        if not isinstance(value, int):
            raise ValueError(f"cannot evaluate dim {expr!r} from {sizes}")
        assume(value >= 1)
        sizes[expr] = value
    return sizes


def _concrete_shape(
    draw: st.DrawFn, spec: InputSpec, sizes: Mapping[str, int], options: InputOptions
) -> tuple[int, ...]:
    if spec.dims is None:
        raise ValueError(
            f"input {spec.name!r} has unknown rank; give a strategy for it (strategies={{{spec.name!r}: ...}})"
        )
    shape: list[int] = []
    for dim in spec.dims:
        if isinstance(dim, int):
            shape.append(dim)
        elif isinstance(dim, str):
            shape.append(sizes[dim])
        else:  # unnamed: independent of every other dim
            shape.append(draw(st.integers(*options.dim_range)))
    return tuple(shape)


def _draw_override(draw: st.DrawFn, override: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if isinstance(override, st.SearchStrategy):
        value = draw(override)
    elif callable(override):
        value = draw(override(shape))
    else:
        value = override
    return np.asarray(value, dtype=dtype)


def _draw_order(spec: InputSpec) -> int:
    # Masks first: position ids are derived from them.
    return {Role.ATTENTION_MASK: 0, Role.POSITION_IDS: 2}.get(spec.role, 1)


@st.composite
def _examples(
    draw: st.DrawFn,
    specs: Sequence[InputSpec],
    options: InputOptions,
    overrides: Mapping[str, Any],
) -> Example:
    sizes = _draw_dim_sizes(draw, specs, options)
    shapes = {spec.name: _concrete_shape(draw, spec, sizes, options) for spec in specs}
    has_padded = any(s.role in (Role.ATTENTION_MASK, Role.POSITION_IDS) for s in specs)
    side: str | None = None
    if has_padded:
        side = draw(st.sampled_from(["right", "left"])) if options.padding == "both" else options.padding
    exponents = (-4, 5) if options.large_magnitudes else options.float_exponents
    feeds: dict[str, np.ndarray] = {}
    masks: list[np.ndarray] = []
    for spec in sorted(specs, key=_draw_order):
        shape = shapes[spec.name]
        dtype = _numpy_dtype(spec.dtype)
        if spec.name in overrides:
            feeds[spec.name] = _draw_override(draw, overrides[spec.name], shape, dtype)
            if spec.role is Role.ATTENTION_MASK:
                masks.append(feeds[spec.name])
            continue
        if spec.role is Role.FLOAT:
            draw_floats = spread_float_arrays if options.spread_magnitudes else float_arrays
            value = draw(draw_floats(shape, dtype, exponents=exponents))
        elif spec.role is Role.TOKEN_IDS:
            assert spec.vocab_size is not None
            value = draw(token_ids(shape, spec.vocab_size, dtype))
        elif spec.role is Role.ATTENTION_MASK:
            if side == "none":
                value = np.ones(shape, dtype=dtype)
            else:
                value = draw(attention_masks(shape, dtype, side=side))  # type: ignore[arg-type]
            masks.append(value)
        elif spec.role is Role.POSITION_IDS:
            value = _positions_for(draw, shape, dtype, masks, side)
        elif spec.role is Role.BOOL:
            value = draw(hnp.arrays(np.bool_, shape))
        else:
            value = draw(_ints_in_range(shape, dtype, *options.int_range))
        feeds[spec.name] = value
    ordered = {spec.name: feeds[spec.name] for spec in specs}
    return Example(feeds=ordered, dims=sizes, padding=side)


def _positions_for(
    draw: st.DrawFn, shape: tuple[int, ...], dtype: np.dtype, masks: Sequence[np.ndarray], side: str | None
) -> np.ndarray:
    """Position ids agreeing with a drawn mask when one covers them, else on their own.

    A 1-D input (``cache_position``) counts 0, 1, ... with no padding.
    """
    if len(shape) <= 1:
        return np.arange(shape[0] if shape else 1).reshape(shape).astype(dtype)
    if len(shape) == 2:
        for mask in masks:
            if mask.ndim == 2 and mask.shape[0] == shape[0] and mask.shape[1] >= shape[1]:
                return positions_from_mask(mask, shape[1]).astype(dtype)
    if side in (None, "none"):
        rows, length = _rows_and_length(shape)
        return np.broadcast_to(np.arange(length), (rows, length)).reshape(shape).astype(dtype)
    return draw(position_ids(shape, dtype, side=side))  # type: ignore[arg-type]


def input_strategy(
    model: ir.Model,
    *,
    strategies: Mapping[str, Any] | None = None,
    options: InputOptions | None = None,
) -> st.SearchStrategy[Example]:
    """A strategy of complete feeds for ``model``'s inputs.

    ``strategies`` maps an input name to its replacement (a strategy of
    arrays, a callable ``shape -> strategy``, or a fixed array).
    """
    options = options or InputOptions()
    if model.metadata_props.get(MASKS_KEY) == "all-ones":  # the graph's declared domain: unpadded rows only
        options = dataclasses.replace(options, padding="none")
    overrides = dict(strategies or {})
    specs = describe_inputs(
        model, vocab_size=options.vocab_size, fallback_vocab_size=options.fallback_vocab_size
    )
    unknown = sorted(set(overrides) - {s.name for s in specs})
    if unknown:
        raise ValueError(f"strategies given for inputs the model does not have: {', '.join(unknown)}")
    return _examples(specs, options, overrides)

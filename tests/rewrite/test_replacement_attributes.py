"""A replacement's node attributes are exactly what onnx_ir's own conversion makes of the same values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.rewrite.replacement import ReplacementBuilder, node_attributes

_FLOATS = st.floats(allow_nan=False, width=32)
_SCALARS = st.one_of(st.integers(-2**62, 2**62), st.booleans(), _FLOATS, st.text(max_size=5))
_VALUES = st.one_of(
    _SCALARS,
    st.lists(st.integers(-2**62, 2**62), min_size=1, max_size=4),
    st.lists(_FLOATS, min_size=1, max_size=4).map(tuple),
    st.lists(st.text(max_size=3), min_size=1, max_size=3),
    st.lists(st.booleans(), min_size=1, max_size=3),
    st.lists(st.one_of(st.integers(0, 9), _FLOATS), min_size=2, max_size=3),  # mixed: onnx_ir refuses most
    st.just(ir.tensor(np.array([1.0, 2.0], np.float32))),
)


def _described(attrs: list[ir.Attr]) -> list[tuple]:
    return [(a.name, a.type, a.value if a.type != ir.AttributeType.TENSOR else id(a.value)) for a in attrs]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["axis", "value_ints", "to", "mode", "alpha"]), _VALUES, max_size=4))
def test_attribute_types_and_values_match_onnx_ir_conversion(attributes: dict) -> None:
    try:
        expected = _described(ir.convenience.convert_attributes(attributes))
    except TypeError:
        with pytest.raises(TypeError):
            node_attributes(attributes)
        return
    assert _described(node_attributes(attributes)) == expected


def test_the_builder_makes_nodes_with_those_attributes() -> None:
    op = ReplacementBuilder(use_initializers=True, name_prefix="t")
    out = op.Constant(value_ints=[0, 3])
    attr = out.producer().attributes["value_ints"]
    assert (attr.type, attr.value) == (ir.AttributeType.INTS, (0, 3))

"""A replay whose reference has a KV cache itself: both cached graphs driven on the same tokens.

The graph before ``kv-cache`` may already have optimum's concat cache, which
the pass converts to the retained form; there is no no-cache graph then,
and ``--verify`` replays the input's concat cache against the output's
retained cache. The tiny LMs of ``kv_graphs`` compute one function in both
forms: the correct retained form matches the concat reference on every
drawn case, and every retained mutant (a wrong conversion) is caught.
"""

from __future__ import annotations

import kv_graphs as kv
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import BadInputError, PassFailure
from qgraph.verify import step_verifier
from qgraph.verify.cache_steps import CachedReference
from qgraph.verify.sequence import ReplayCase, SequenceReplayer, check_sequence_equivalence, replay

EXAMPLES = 20


@pytest.mark.parametrize("last_logits", [False, True], ids=["all-logits", "last-logits"])
def test_the_retained_form_replays_like_the_concat_form_it_was_converted_from(last_logits):
    result = check_sequence_equivalence(
        kv.retained_lm(layers=2, heads=2, last_logits=last_logits), kv.concat_lm(layers=2, heads=2),
        examples=EXAMPLES, require_greedy=True,
    )
    assert result.equivalent, str(result)


@pytest.mark.parametrize("mutant", kv.RETAINED_MUTANTS)
def test_a_wrong_conversion_is_caught_against_the_concat_reference(mutant):
    result = check_sequence_equivalence(kv.retained_lm(mutant=mutant), kv.concat_lm(), examples=60)
    assert not result.equivalent, f"{mutant} not caught"
    assert result.result is not None and result.result.first_failure is not None


def test_a_concat_reference_whose_own_cache_is_wrong_does_not_pass_as_the_reference():
    """The reference is driven through its cache: a broken input cache shows up, it is not taken on trust."""
    result = check_sequence_equivalence(kv.retained_lm(), kv.concat_lm(mutant="ignore_past"), examples=60)
    assert not result.equivalent
    # A present output that breaks the concat contract is the input's fault: bad input, naming the output.
    with pytest.raises(BadInputError, match=r"the reference fails on a drawn case: present\.0\.key has shape"):
        check_sequence_equivalence(kv.retained_lm(), kv.concat_lm(mutant="drop_past"), examples=60)


@settings(max_examples=15, deadline=None, database=None)
@given(split=st.lists(st.integers(1, 3), min_size=1, max_size=4), batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_the_cached_reference_gives_the_no_cache_logits_at_every_valid_column(split, batch, seed):
    """Replaying through the concat cache in any split gives what the no-cache graph gives for the whole sequence."""
    total = sum(split)
    tokens = np.random.default_rng(seed).integers(0, kv.VOCAB, (batch, total))
    lengths = np.random.default_rng(seed + 1).integers(1, total + 1, batch)
    with SequenceReplayer(kv.retained_lm(), kv.concat_lm()) as cached_ref, \
            SequenceReplayer(kv.retained_lm(), kv.no_cache_lm()) as plain_ref:
        case = ReplayCase.from_lengths(tokens, split, lengths, "left" if seed % 2 else "right")
        got = cached_ref._reference(case, total)
        want = plain_ref._reference(case, total)
    np.testing.assert_allclose(got[case.valid], want[case.valid], rtol=1e-4, atol=1e-4)


def test_a_reference_counting_positions_from_column_0_gets_left_padded_rows_replayed_alone(monkeypatch):
    """Without position_ids the reference shifts a left-padded row's positions; the row alone is its meaning."""
    tokens = np.random.default_rng(3).integers(0, kv.VOCAB, (2, 6))
    reference = kv.concat_lm(positions="columns")
    result = replay(kv.retained_lm(), reference, tokens, [3, 1, 2], lengths=[6, 3], padding="left")
    assert result.passed, str(result)
    # Without the unpadded replay the shifted positions differ: the rule is what makes it pass.
    monkeypatch.setattr(CachedReference, "_unpadded_rows", lambda self, rows, logits: logits)
    shifted = replay(kv.retained_lm(), reference, tokens, [3, 1, 2], lengths=[6, 3], padding="left")
    assert not shifted.passed


def test_verify_of_a_cache_conversion_says_it_replayed_both_caches():
    verify = step_verifier(examples=8)
    before, after = ir.from_proto(kv.concat_lm()), ir.from_proto(kv.retained_lm())
    proved = verify(before, after, "kv-cache", meaning="sequence")
    assert "input's own cache" in proved
    with pytest.raises(PassFailure, match="NOT SEQUENCE-EQUIVALENT"):
        verify(before, ir.from_proto(kv.retained_lm(mutant="late_write")), "kv-cache", meaning="sequence")

"""Output rows at padding query positions have no defined meaning, so they are not compared.

A decoder's output at a query token whose own ``attention_mask`` entry is 0
is whatever the exporter's arithmetic makes of a fully or partly masked row:
optimum's with-past graph and its KV-cache conversion give different
numbers there and the same numbers everywhere else. Comparing those rows
would report two correct graphs as different, so before outputs are
compared the candidate's values at those rows are set to the reference's,
and the check reports how many rows it did not compare.

The rows are read from the feeds by the names every exporter uses:
``input_ids`` [batch, seq] and ``attention_mask`` [batch, past + seq], whose
last ``seq`` columns are the queries' own entries. An output is affected
when its first two dims are [batch, seq].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["padding_query_rows", "skip_padding_rows"]


def padding_query_rows(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """[batch, seq] booleans, True where the query token is padding; None without ids and mask."""
    ids, mask = feeds.get("input_ids"), feeds.get("attention_mask")
    if ids is None or mask is None or ids.ndim != 2 or mask.ndim != 2:
        return None
    batch, seq = ids.shape
    if mask.shape[0] != batch or mask.shape[1] < seq or seq == 0:
        return None
    return mask[:, mask.shape[1] - seq :] == 0


def skip_padding_rows(
    feeds: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
) -> int:
    """Make the candidate equal the reference at padding query rows; return how many rows that was."""
    padded = padding_query_rows(feeds)
    if padded is None or not padded.any():
        return 0
    skipped = 0
    for ref_name, cand_name in pairs:
        ref, cand = reference.get(ref_name), candidate.get(cand_name)
        if ref is None or cand is None or ref.shape != cand.shape or ref.ndim < 2 or ref.shape[:2] != padded.shape:
            continue
        fixed = np.array(cand, copy=True)
        fixed[padded] = ref[padded]
        candidate[cand_name] = fixed
        skipped += int(padded.sum())
    return skipped

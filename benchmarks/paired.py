"""How sure a paired comparison is: the median of per-round ratios and a distribution-free interval for it.

Decode rates on this machine move by several percent from one minute to the
next, and two engines measured in the same round share that drift, so the
ratio of a round's pair is the figure to judge; its median over the rounds
is the estimate. The interval needs no assumption about how the ratios are
distributed: the true median lies between the j-th smallest and j-th largest
of n independent ratios unless at least n - j + 1 of them fall on one side,
which has probability 2 * P(Binomial(n, 1/2) <= j - 1). With few rounds no j
reaches the asked confidence and the interval is the whole range, with the
confidence it does have.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["median_interval", "paired_summary"]


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, achieved confidence): the narrowest order-statistic interval for the median of ``values``
    whose confidence is at least ``confidence`` (the whole range when no interval reaches it)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")

    def coverage(j: int) -> float:  # of [x_(j), x_(n-j+1)], 1-based
        below = sum(math.comb(n, i) for i in range(j)) / 2**n
        return max(0.0, 1.0 - 2.0 * below)

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= confidence:
        j += 1
    return ordered[j - 1], ordered[n - j], coverage(j)


def paired_summary(ratios: Sequence[float], confidence: float = 0.95) -> str:
    """'1.02x (95 % interval 1.00x-1.04x; above 1 in 11/15 rounds)' for per-round ratios of ours over theirs."""
    low, high, achieved = median_interval(ratios, confidence)
    ahead = sum(1 for r in ratios if r > 1.0)
    return (f"{statistics.median(ratios):.2f}x ({achieved:.0%} interval {low:.2f}x-{high:.2f}x; "
            f"above 1 in {ahead}/{len(ratios)} rounds)")

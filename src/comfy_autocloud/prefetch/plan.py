"""When a predicted model is worth fetching ahead: the expected saving against what it would evict.

Fetching `x` (probability `p` of being the next load, `size` bytes) saves, in expectation, `p * size`
bytes of loader wait. If it does not fit, the store's policy evicts victims; each victim `v` is needed
again within the next HORIZON loads with a probability estimated from its share of recent loads
(`1 - (1 - share)^HORIZON`), and then costs its size in wait. Prefetch only when the saving is
larger. The same rule runs in the live prefetcher and in the replay that scores it.
"""

from __future__ import annotations

from collections.abc import Iterable

HORIZON = 30  # loads within which an evicted model would have been used again (about a session or two)
# After the session gap the link is idle for a long while and the next load starts a session, which is
# harder to guess (each start is less likely): plan more guesses, down to a lower score, by the same rule.
PAUSE_PREFETCH, PAUSE_MIN_SCORE = 3, 0.05


def reuse_probability(share: float, horizon: int = HORIZON) -> float:
    """Chance that a model with this share of recent loads is loaded within the next `horizon` loads."""
    share = min(1.0, max(0.0, share))
    return 1.0 - (1.0 - share) ** horizon


def eviction_cost(victims: Iterable[tuple[int, float]], horizon: int = HORIZON) -> float:
    """Expected bytes re-downloaded because of evicting `(size, share of recent loads)` victims."""
    return sum(size * reuse_probability(share, horizon) for size, share in victims)


def worth_prefetching(p_next: float, size: int, victims: Iterable[tuple[int, float]],
                      horizon: int = HORIZON) -> bool:
    """Expected bytes of waiting saved by fetching now beat the expected bytes its evictions cost."""
    return p_next * size > eviction_cost(victims, horizon)

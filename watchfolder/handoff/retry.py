"""The wait between tries of a hook or a webhook delivery: exponential, capped, jittered."""

from __future__ import annotations

from collections.abc import Callable

from watchfolder.coordination.ratelimit import backoff


def backoff_delay(attempt: int, first: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds to wait after failed try number `attempt` (1-based): `first` doubled per try,
    capped at `cap`, then jittered into its upper half so that retries spread out."""
    ceiling = backoff(min(attempt, 60), first, cap)
    return ceiling * (0.5 + 0.5 * rand())


"""Exponential back-off, the one formula for every retry loop (forwarders, C-STORE retries,
webhooks): ``base * 2**attempt``, capped, with "equal jitter" (half fixed, half random) so
stations that lost the same link do not come back in step."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    jitter: bool = True,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 = the first retry waits ``base_s``)."""
    delay = min(cap_s, base_s * 2.0 ** min(max(attempt, 0), 32))
    return delay * (0.5 + rand() / 2) if jitter else delay

"""The one backoff every retry loop uses (S3 fetches, replica calls, outcome re-sends)."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_s(
    attempt: int,
    first_s: float = 0.1,
    cap_s: float = 5.0,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Exponential backoff with jitter: half fixed, half random, so retries spread out.

    Attempt n waits in [b·2^(n-1)/2, b·2^(n-1)] for b = `first_s`, capped at `cap_s`; pass a
    seeded generator's `uniform` for repeatable delays."""
    base = min(first_s * 2 ** (attempt - 1), cap_s)
    return base / 2 + uniform(0, base / 2)

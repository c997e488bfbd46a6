"""Exponential backoff with jitter, shared by job retries and deliveries."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, *, base_seconds: float, max_seconds: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): ``base * 2**(attempt-1)``,
    capped at ``max_seconds``, times a ±20% jitter so that retries of many items spread out."""
    base = min(base_seconds * 2.0 ** (attempt - 1), max_seconds)
    jitter: float = (rng or random).uniform(0.8, 1.2)  # jitter, not cryptography
    return base * jitter

"""Request rate limits: a token bucket per caller, in each worker's memory.

Each gunicorn worker counts on its own, so with N workers a caller may reach N times the
configured rate at most; that keeps the check off the database on every request. The
concurrent-run cap per organisation, which must hold across workers, is enforced by the
database when a run starts (see runtime.runs).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .errors import ApiError


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """Allow ``per_minute`` requests a minute per caller, in bursts of up to as many."""

    per_minute: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    MAX_CALLERS = 50_000

    def check(self, caller: str) -> None:
        """Count a request of ``caller``; raise a 429 with Retry-After if over the limit."""
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        rate = self.per_minute / 60.0
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self.MAX_CALLERS:
                self._forget_idle(now)
            bucket = self._buckets[caller] = _Bucket(float(self.per_minute), now)
        else:
            bucket.tokens = min(self.per_minute, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) / rate)
            raise ApiError(
                429,
                f"Rate limit of {self.per_minute} requests a minute reached; retry in {wait} s.",
                headers={"Retry-After": str(wait)},
            )
        bucket.tokens -= 1

    def _forget_idle(self, now: float) -> None:
        """Drop callers whose bucket has refilled: forgetting them changes nothing."""
        full_after = 60.0
        for caller in [c for c, b in self._buckets.items() if now - b.updated > full_after]:
            del self._buckets[caller]

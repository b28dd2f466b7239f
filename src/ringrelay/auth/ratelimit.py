"""Token buckets in memory, per key (an identity, a client address); bounded in size."""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class RateLimiter:
    """`per_minute` requests per key, with bursts up to the same number; 0 disables it.

    Per instance: behind a load balancer each instance allows this much, which bounds abuse
    without a shared store on the registrar path.
    """

    def __init__(self, per_minute: int, max_keys: int = 100_000) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, key: str, now: float | None = None) -> float | None:
        """Take one token; None if allowed, else the seconds until one is available."""
        if self.capacity <= 0:
            return None
        now = time.monotonic() if now is None else now
        tokens, updated = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = None
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)  # forget the least recently seen key
        return wait


def retry_after_header(wait: float) -> str:
    return str(max(1, math.ceil(wait)))

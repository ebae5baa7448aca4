"""Small bounded structures the syncnode budgets strangers with: an LRU map, a token bucket,
and one token bucket per key (an endpoint id) in an LRU.

They live apart from the service so the server, the peer sync and the service's parts share
them without importing each other.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio


class LRU(OrderedDict[Any, Any]):
    """An ordered map that forgets its least recently put entries past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class TokenBucket:
    """A rate limit: ``rate`` units/s on average, bursts up to ``burst``. Units are requests
    (take one at a time) or bytes (take a message's size). With ``debt``, a take larger than the
    whole burst (a small configured byte burst) is allowed from a full bucket and leaves the
    bucket negative, so a large message is slowed, never refused forever."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = trio.current_time,
                 *, debt: bool = False) -> None:
        self.rate, self.burst, self.clock, self.debt = rate, float(burst), clock, debt
        self.tokens, self.stamp = float(burst), clock()

    def take(self, n: float = 1.0) -> bool:
        now = self.clock()
        # a clock that steps back (the wall clock admission uses) refills nothing
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= (min(n, self.burst) if self.debt else n):
            self.tokens -= n
            return True
        return False


class KeyedBuckets:
    """One :class:`TokenBucket` per key (an endpoint id), the least recently used forgotten past
    ``capacity``: memory stays bounded whatever number of keys a stranger invents (forgetting
    only lets a key start afresh, which a new key could do anyway; node-wide limits bound that)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float],
                 capacity: int = 10_000, *, debt: bool = False) -> None:
        self.rate, self.burst, self.clock, self.debt = rate, burst, clock, debt
        self.buckets = LRU(capacity)

    def take(self, key: bytes, n: float = 1.0) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self.clock, debt=self.debt)
        self.buckets.put(key, bucket)
        return bool(bucket.take(n))

"""Per-tool admission control: a concurrency quota and a QPS token bucket (asyncio, one event loop)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """``rate`` tokens per second, bursts up to ``burst``; ``acquire`` waits for a token (FIFO-ish)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"token bucket rate must be > 0 calls/s, got {rate}")
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else max(1.0, rate))
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                self._refill()
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


class Admission:
    """Quota (max concurrent calls) and QPS limit per tool name; unknown tools are unlimited."""

    def __init__(
        self, max_concurrent: dict[str, int] | None = None, qps: dict[str, float] | None = None
    ) -> None:
        for tool, n in (max_concurrent or {}).items():
            if n < 1:
                raise ValueError(f"toolbox quota for `{tool}` must be >= 1 concurrent call, got {n}")
        self._sems = {t: asyncio.Semaphore(n) for t, n in (max_concurrent or {}).items()}
        self._buckets = {t: TokenBucket(r) for t, r in (qps or {}).items()}
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def __call__(self, tool: str, fn):
        sem = self._sems.get(tool)
        if sem is not None:
            await sem.acquire()
        try:
            if tool in self._buckets:
                await self._buckets[tool].acquire()
            self.in_flight[tool] = self.in_flight.get(tool, 0) + 1
            self.peak[tool] = max(self.peak.get(tool, 0), self.in_flight[tool])
            try:
                return await fn()
            finally:
                self.in_flight[tool] -= 1
        finally:
            if sem is not None:
                sem.release()

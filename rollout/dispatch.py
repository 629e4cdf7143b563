"""Least-loaded dispatch of single sequences over engines, sticky per trajectory, with failover.

A request that fails because its engine is unreachable or answers 5xx is sent again to another
engine; the caller gets exactly one result per request, so nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from rollout.engine_client import EngineClient, EngineError, _retryable

log = logging.getLogger(__name__)
T = TypeVar("T")


class Dispatcher:
    def __init__(self, urls: list[str], *, timeout_s: float = 300.0, max_retries: int = 3,
                 num_layers: int | None = None, top_k: int | None = None) -> None:
        if not urls:
            raise ValueError("Dispatcher needs at least one engine URL")
        # Retries inside a client are few: failing over to a healthy engine beats waiting on a dead one.
        self.clients = [EngineClient(u, timeout_s=timeout_s, max_retries=1, num_layers=num_layers, top_k=top_k)
                        for u in urls]
        self.max_failovers = max_retries
        self.in_flight = [0] * len(urls)
        self.failed = [False] * len(urls)
        self.sticky: dict[str, int] = {}
        self.failovers = 0

    def pick(self, key: str | None = None, exclude: set[int] | None = None) -> int:
        exclude = exclude or set()
        if key is not None and key in self.sticky and self.sticky[key] not in exclude:
            return self.sticky[key]
        healthy = [i for i in range(len(self.clients)) if i not in exclude and not self.failed[i]]
        candidates = healthy or [i for i in range(len(self.clients)) if i not in exclude]
        if not candidates:
            raise EngineError("all engines", "no engine left to try")
        index = min(candidates, key=lambda i: (self.in_flight[i], i))
        if key is not None:
            self.sticky[key] = index
        return index

    async def run(self, call: Callable[[EngineClient], Awaitable[T]], *, key: str | None = None) -> T:
        """Run `call` on the least-loaded (or the trajectory's) engine, failing over on engine faults."""
        tried: set[int] = set()
        while True:
            index = self.pick(key, tried)
            self.in_flight[index] += 1
            try:
                result = await call(self.clients[index])
                self.failed[index] = False
                return result
            except Exception as e:  # noqa: BLE001 - classified below
                if not _retryable(e) or len(tried) >= self.max_failovers:
                    raise
                tried.add(index)
                self.failed[index] = True
                self.failovers += 1
                if key is not None:
                    self.sticky.pop(key, None)
                log.warning("engine %s failed (%s); retrying on another engine", self.clients[index].url, e)
                if len(tried) >= len(self.clients):
                    tried = set()  # every engine failed once: try again from the start (it may be back)
            finally:
                self.in_flight[index] -= 1

    def release(self, key: str) -> None:
        self.sticky.pop(key, None)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

"""Dispatcher.wait_idle: a weight push waits for aborted requests exactly as long as they take to come back."""

from __future__ import annotations

import asyncio
import time

from rollout.dispatch import Dispatcher


def test_wait_idle_returns_when_the_last_request_ends_and_times_out_while_one_runs() -> None:
    async def scenario() -> None:
        dispatcher = Dispatcher(["http://127.0.0.1:9", "http://127.0.0.1:10"])
        assert await dispatcher.wait_idle(timeout_s=0.0)  # nothing in flight
        release = asyncio.Event()

        async def held(_client) -> str:
            await release.wait()
            return "done"

        async def quick(_client) -> str:
            await asyncio.sleep(0.05)
            return "quick"

        slow = asyncio.ensure_future(dispatcher.run(held))
        fast = asyncio.ensure_future(dispatcher.run(quick))
        await asyncio.sleep(0)
        assert sum(dispatcher.in_flight) == 2
        assert not await dispatcher.wait_idle(timeout_s=0.1)  # `held` is still in flight
        assert await fast == "quick" and sum(dispatcher.in_flight) == 1
        waiting = asyncio.ensure_future(dispatcher.wait_idle(timeout_s=5.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        start = time.monotonic()
        release.set()
        assert await waiting and await slow == "done"
        assert time.monotonic() - start < 1.0  # woken by the request's end, not by the timeout
        assert dispatcher._idle_waiters == []  # no waiter is left behind, timed out or woken
        await dispatcher.close()

    asyncio.run(scenario())

"""Least-loaded dispatch of single sequences over engines, sticky per trajectory, with bounded failover.

A request that fails because its engine is unreachable, times out, answers 5xx or answers something
malformed is sent again, preferably to another engine; the caller gets exactly one result per
request, so nothing is lost or duplicated. Retries are bounded twice over: at most `max_retries`
re-sends per request, and no more than `retry_window_s` of waiting since the first fault. Between
attempts the dispatcher backs off exponentially with jitter (tenacity) and, when every engine has
failed, waits for one to answer /health again (an engine actor restarts a dead server on the same
URL). When the bound is hit, `EngineUnavailable` names every engine tried and the last cause.

A multi-turn trajectory may instead hold a session on its engine (`open_session` /
`generate_in_session` / `close_session`): the engine keeps the conversation's KV cache, so a session
request is tried once, on that engine only; an engine fault raises `SessionLost`, and the caller resends
the whole context through `generate`, which fails over like any other request.

With a `Gate` (rollout/scheduler.py closes it for a weight push) no request is sent while it is closed, re-sends
included; `in_flight` and `busy_seconds` tell the scheduler when every request has come back and how busy
each engine was.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from rollout.engine_client import EngineClient, EngineError, is_engine_fault
from rollout.sglang_api import GenerateRequest, GenerateResponse, SessionParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineUnavailable(EngineError):
    """A request failed on every attempt the retry bounds allow; names the engines and the last cause."""

    def __init__(self, urls: list[str], attempts: int, elapsed_s: float, cause: BaseException | None,
                 hint: str = "") -> None:
        self.urls = list(urls)
        self.attempts = attempts
        self.cause = cause
        message = (f"request failed after {attempts} attempt(s) over {elapsed_s:.1f}s on engine(s) "
                   f"{', '.join(self.urls)}; last error: {type(cause).__name__}: {cause}")
        super().__init__(", ".join(self.urls), message + (f"; {hint}" if hint else ""))


class SessionLost(EngineError):
    """The engine holding a trajectory's session failed; its KV cache is gone with it (resend the context)."""


@dataclass
class EngineSession:
    """A trajectory's session on one engine; `last_rid` is the request the next turn continues from."""

    key: str
    index: int
    id: str
    last_rid: str | None = None


class Gate:
    """Open while the engines may generate. `close` (before a weight push) bumps `epoch`, so a request that
    comes back aborted knows whether a pause caused it (then it is continued, not given up)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.epoch = 0

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def close(self) -> None:
        if self._open.is_set():
            self.epoch += 1
            self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        """Return only while open: whoever sends right after this (no await between) sends before any pause."""
        while not self._open.is_set():
            await self._open.wait()


class _StopAfterFaultWindow(stop_base):
    """Stop once `window_s` have passed since the request's first fault (not since its first try, which may
    have generated for minutes before the engine died)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.first_fault: float | None = None

    def __call__(self, retry_state: object) -> bool:
        now = time.monotonic()
        if self.first_fault is None:
            self.first_fault = now
        return now - self.first_fault >= self.window_s


class Dispatcher:
    """Sends each request to one engine and fails over within the bounds of `max_retries` / `retry_window_s`."""

    def __init__(self, urls: list[str], *, timeout_s: float = 300.0, max_retries: int = 3,
                 retry_window_s: float = 300.0, backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                 num_layers: int | None = None, top_k: int | None = None, gate: Gate | None = None) -> None:
        if not urls:
            raise ValueError("Dispatcher needs at least one engine URL")
        # The dispatcher owns retrying (it can fail over to another engine); each client sends once.
        self.clients = [EngineClient(u, timeout_s=timeout_s, max_retries=0, num_layers=num_layers, top_k=top_k)
                        for u in urls]
        self.max_retries = max(0, int(max_retries))
        self.retry_window_s = float(retry_window_s)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.in_flight = [0] * len(urls)
        self.failed = [False] * len(urls)
        self.sticky: dict[str, int] = {}
        self.failovers = 0  # requests re-sent after a fault (cumulative over this dispatcher)
        self.attempts = 0  # requests sent, first tries included
        self._busy_since: list[float | None] = [None] * len(urls)  # an engine has >= 1 request in flight since
        self._busy_s = [0.0] * len(urls)
        self._idle_waiters: list[asyncio.Future[None]] = []  # wait_idle callers, woken when nothing is in flight
        self.gate = gate  # while closed (a weight push), no request is sent, first tries and re-sends alike

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.clients]

    def pick(self, key: str | None = None, exclude: set[int] | None = None) -> int:
        """The trajectory's engine if it has one, else the least-loaded healthy engine (any engine if none)."""
        exclude = exclude or set()
        if key is not None and key in self.sticky and self.sticky[key] not in exclude \
                and not self.failed[self.sticky[key]]:
            return self.sticky[key]
        healthy = [i for i in range(len(self.clients)) if i not in exclude and not self.failed[i]]
        candidates = healthy or [i for i in range(len(self.clients)) if i not in exclude] \
            or list(range(len(self.clients)))
        index = min(candidates, key=lambda i: (self.failed[i], self.in_flight[i], i))
        if key is not None:
            self.sticky[key] = index
        return index

    async def run(self, call: Callable[[EngineClient], Awaitable[T]], *, key: str | None = None) -> T:
        """Run `call` on the least-loaded (or the trajectory's) engine, failing over on engine faults.

        Raises the engine's error at once when it is the caller's fault (HTTP 4xx), and
        `EngineUnavailable` when the retry bounds are spent.
        """
        start = time.monotonic()
        tried: list[int] = []
        last: BaseException | None = None
        window = _StopAfterFaultWindow(self.retry_window_s)
        engines_back = True
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1) | window,
            wait=wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s),
            retry=retry_if_exception(is_engine_fault), reraise=False)
        try:
            async for attempt in retrying:
                with attempt:
                    if tried:
                        engines_back = await self._wait_for_an_engine(window.first_fault or start)
                    if self.gate is not None:
                        await self.gate.wait()
                    index = self.pick(key, self._recently_failed(tried))
                    tried.append(index)
                    self.attempts += 1
                    self._started(index)
                    try:
                        result = await call(self.clients[index])
                    except BaseException as e:
                        if is_engine_fault(e):
                            last = e
                            self._fault(index, key, e)
                        raise
                    finally:
                        self._ended(index)
                    self.failed[index] = False
                    return result
        except RetryError:
            pass
        if not engines_back:
            hint = f"no engine answered /health within {self.retry_window_s:g}s (rollout.startup_timeout_s)"
        elif len(tried) > self.max_retries:
            hint = f"{self.max_retries} re-send(s) spent (rollout.max_retries)"
        else:
            hint = f"{self.retry_window_s:g}s since the first fault spent (rollout.startup_timeout_s)"
        raise EngineUnavailable(sorted({self.clients[i].url for i in tried}), len(tried),
                                time.monotonic() - start, last, hint) from last

    def _started(self, index: int) -> None:
        if self.in_flight[index] == 0:
            self._busy_since[index] = time.monotonic()
        self.in_flight[index] += 1

    def _ended(self, index: int) -> None:
        self.in_flight[index] -= 1
        since = self._busy_since[index]
        if self.in_flight[index] == 0 and since is not None:
            self._busy_s[index] += time.monotonic() - since
            self._busy_since[index] = None
        if not any(self.in_flight):
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def busy_seconds(self) -> list[float]:
        """Per engine, the seconds so far during which it had at least one of this dispatcher's requests in
        flight (the engine busy fraction of rollout/scheduler.py)."""
        now = time.monotonic()
        return [total + (now - since if since is not None else 0.0)
                for total, since in zip(self._busy_s, self._busy_since)]

    async def abort_in_flight(self) -> None:
        """Ask every engine with requests of this dispatcher in flight to abort them all (they come back with
        finish_reason abort and what they generated so far); a dead engine has nothing left to abort."""
        async def abort(client: EngineClient) -> None:
            try:
                await client.abort()
            except Exception as e:  # engine faults only; anything else is a bug and raises
                if not is_engine_fault(e):
                    raise
        await asyncio.gather(*(abort(c) for c, n in zip(self.clients, self.in_flight) if n))

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request of this dispatcher is in flight (True), or `timeout_s` (False): a weight push
        waits for aborted requests to come back as soon as they do, not on a polling interval."""
        if not any(self.in_flight):
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)

    def _recently_failed(self, tried: list[int]) -> set[int]:
        """Avoid the engines this request already failed on while others are left to try."""
        exclude = set(tried)
        return exclude if len(exclude) < len(self.clients) else set()

    def _fault(self, index: int, key: str | None, error: BaseException) -> None:
        self.failed[index] = True
        self.failovers += 1
        if key is not None:
            self.sticky.pop(key, None)
        log.warning("engine %s failed (%s: %s); retrying with backoff", self.clients[index].url,
                    type(error).__name__, error)

    async def _wait_for_an_engine(self, since: float) -> bool:
        """When every engine has failed, wait (backoff + jitter) until one answers /health again, at most until
        `retry_window_s` after `since`; False when none did."""
        if not all(self.failed):
            return True
        remaining = self.retry_window_s - (time.monotonic() - since)
        if remaining <= 0:
            return False
        probing = AsyncRetrying(stop=stop_after_delay(remaining),
                                wait=wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s),
                                retry=retry_if_result(lambda up: not up))
        try:
            async for attempt in probing:
                with attempt:
                    up = await asyncio.gather(*(c.health() for c in self.clients))
                    for i, ok in enumerate(up):
                        if ok:
                            self.failed[i] = False
                    any_up = any(up)
                if not attempt.retry_state.outcome.failed:
                    attempt.retry_state.set_result(any_up)
        except RetryError:
            return False  # nobody came back: the next attempt fails fast and ends the request with the error
        return True

    async def generate(self, request: GenerateRequest, *, key: str | None = None) -> GenerateResponse:
        """/generate with failover; the first attempt keeps `request.rid` (if set), each re-send gets a fresh
        one: SGLang refuses a duplicate request ID in flight with a 400 (not retried), and a re-send may reach
        an engine where the earlier attempt is still running."""
        rids = iter([request.rid] if request.rid else [])
        return await self.run(lambda c: c.generate(replace(request, rid=next(rids, None) or uuid.uuid4().hex)),
                              key=key)

    async def open_session(self, key: str) -> EngineSession:
        """Open a session on the trajectory's engine (sticky from here on); an engine fault raises SessionLost."""
        index = self.pick(key)
        session_id = await self._once(index, key, lambda c: c.open_session())
        return EngineSession(key=key, index=index, id=session_id)

    async def generate_in_session(self, session: EngineSession, request: GenerateRequest) -> GenerateResponse:
        """Send `request` (the tokens added since the session's last turn) once, to the session's engine,
        continuing after `session.last_rid`; an engine fault raises SessionLost (the session is then gone)."""
        rid = request.rid or uuid.uuid4().hex
        request = replace(request, rid=rid, session_params=SessionParams(id=session.id, rid=session.last_rid))
        response = await self._once(session.index, session.key, lambda c: c.generate(request, retries=0))
        session.last_rid = rid
        return response

    async def close_session(self, session: EngineSession) -> None:
        """Best effort: a dead engine took the session with it."""
        try:
            await self.clients[session.index].close_session(session.id)
        except Exception as e:  # engine faults only; anything else is a bug and raises
            if not is_engine_fault(e):
                raise
            log.info("closing session %s on %s failed: %s", session.id, self.clients[session.index].url, e)

    async def _once(self, index: int, key: str, call: Callable[[EngineClient], Awaitable[T]]) -> T:
        if self.gate is not None:
            await self.gate.wait()
        self.attempts += 1
        self._started(index)
        try:
            result = await call(self.clients[index])
        except Exception as e:
            if not is_engine_fault(e):
                raise
            self._fault(index, key, e)
            raise SessionLost(self.clients[index].url, f"session engine failed ({type(e).__name__}: {e})") from e
        finally:
            self._ended(index)
        self.failed[index] = False
        return result

    def release(self, key: str) -> None:
        """The trajectory is over: forget its engine."""
        self.sticky.pop(key, None)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

"""Async HTTP client for one engine that speaks SGLang's native API (SGLang or the local HF server).

One pooled aiohttp session per client; connection errors and 5xx answers are retried with
exponential backoff (tenacity), 4xx answers are the caller's mistake and raise at once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Self

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from mopd.core.types import TokenScores
from rollout.sglang_api import GenerateRequest, GenerateResponse, ProtocolError


class EngineError(RuntimeError):
    """The engine answered with an error, or could not be reached after the retries."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        self.url = url
        self.status = status
        super().__init__(f"{url}: {message}" + (f" (HTTP {status})" if status else ""))


class MalformedResponse(EngineError):
    """The engine answered, but not with what the protocol promises (bad JSON, missing or wrong-length fields).

    Retried like an engine fault (another engine may be fine) but within the same bounds, never forever.
    """


def is_engine_fault(exc: BaseException) -> bool:
    """Engine faults (unreachable, timeout, 5xx, malformed answer) are worth another try; 4xx are not."""
    if isinstance(exc, EngineError):
        return exc.status is None or exc.status >= 500
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError))


class EngineClient:
    def __init__(self, url: str, *, timeout_s: float = 300.0, max_retries: int = 3,
                 num_layers: int | None = None, top_k: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.num_layers = num_layers  # to decode routed experts
        self.top_k = top_k
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout,
                                                  connector=aiohttp.TCPConnector(limit=256))
        return self._session

    async def request(self, method: str, path: str, body: Any = None, *, retries: int | None = None,
                      timeout_s: float | None = None) -> Any:
        """One call with retries on connection errors and 5xx; returns the decoded JSON (or text)."""
        attempts = (self.max_retries if retries is None else retries) + 1
        async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts), reraise=True,
                                           wait=wait_exponential(multiplier=0.2, max=5.0),
                                           retry=retry_if_exception(is_engine_fault)):
            with attempt:
                return await self._once(method, path, body, timeout_s)

    async def _once(self, method: str, path: str, body: Any, timeout_s: float | None = None) -> Any:
        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
        try:
            async with self._http().request(method, self.url + path, json=body, **extra) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise EngineError(self.url + path, _error_message(text), resp.status)
                if resp.content_type == "application/json" and text:
                    try:
                        return json.loads(text)
                    except ValueError as e:
                        raise MalformedResponse(self.url + path, f"invalid JSON in the answer: {e}") from None
                return text
        except aiohttp.ClientConnectorError as e:
            raise EngineError(self.url + path, f"cannot connect: {e.os_error}") from e

    # --- generation -----------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest, *, retries: int | None = None) -> GenerateResponse:
        body = await self.request("POST", "/generate", request.to_json(), retries=retries)
        if not isinstance(body, dict):
            raise MalformedResponse(self.url + "/generate", f"expected a JSON object, got {body!r:.200}")
        try:
            return GenerateResponse.from_json(body, num_layers=self.num_layers, top_k=self.top_k)
        except (ProtocolError, ValueError) as e:
            raise MalformedResponse(self.url + "/generate", str(e)) from None

    async def score_top_k(self, input_ids: list[int], start: int, top_k: int) -> TokenScores:
        """log p(token_i | tokens_<i) for i in [start, len) in one prefill with prompt logprobs (teacher
        scoring), plus the engine's `top_k` most likely tokens at each of those positions (top_k > 0).

        SGLang's input logprobs at `logprob_start_len = s` begin with `None` for the token at `s` (position
        s has no logprob from inside the request; sglang 0.5.23 ScheduleBatch.prepare_for_extend and
        SchedulerLogprobResultProcessor), so the request starts one token earlier and the leading entry,
        whatever the engine puts there, is dropped.
        """
        if not 1 <= start < len(input_ids):
            raise ValueError(f"score: start must be in [1, {len(input_ids)}) (tokens before it are context), "
                             f"got {start}")
        req = GenerateRequest(input_ids=input_ids, sampling_params={"max_new_tokens": 0, "temperature": 1.0},
                              return_logprob=True, logprob_start_len=start - 1, top_logprobs_num=top_k)
        resp = await self.generate(req)
        n = len(input_ids) - start
        values = resp.input_logprobs or []
        if len(values) != n + 1 or any(v is None for v in values[1:]):
            raise MalformedResponse(self.url, f"score: expected {n + 1} prompt logprobs from position {start - 1} "
                                    f"(the first undefined), got {values!r:.200}")
        scores = TokenScores(logprobs=[float(v) for v in values[1:]])
        if top_k > 0:
            tops = resp.input_top_logprobs or []
            if len(tops) != n + 1 or any(not row for row in tops[1:]):
                raise MalformedResponse(self.url, f"score: expected top-{top_k} logprobs at {n + 1} positions from "
                                        f"{start - 1} (the first undefined), got {tops!r:.200}")
            scores.top_ids = [[t for _, t in row[:top_k]] for row in tops[1:]]
            scores.top_logprobs = [[lp for lp, _ in row[:top_k]] for row in tops[1:]]
        return scores

    async def abort(self, rid: str | None = None) -> None:
        await self.request("POST", "/abort_request", {"rid": rid} if rid else {"abort_all": True})

    # --- state --------------------------------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> bool:
        """One quick probe (a hung engine must not hold up whoever waits for an engine to come back)."""
        try:
            await self.request("GET", "/health", retries=0, timeout_s=min(timeout_s, self.timeout.total or timeout_s))
            return True
        except (TimeoutError, EngineError, aiohttp.ClientError):
            return False

    async def model_info(self) -> dict[str, Any]:
        return await self.request("GET", "/model_info")

    async def open_session(self, capacity_of_str_len: int = 65536) -> str:
        return str(await self.request("POST", "/open_session", {"capacity_of_str_len": capacity_of_str_len}))

    async def close_session(self, session_id: str) -> None:
        await self.request("POST", "/close_session", {"session_id": session_id})


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return text[:500]

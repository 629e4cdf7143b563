"""Request state, session contexts and the batching scheduler of the local HF server.

The scheduler is one asyncio task: it admits pending requests up to --max-batch-size, hands one
step (prefill for newcomers, one decode token for the rest, in the same forward) to a single
worker thread, and finishes requests on stop/length/abort. The event loop stays free for HTTP
(abort, health, pause) while the model runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from rollout.hf_server_engine import ModelRunner, StepInput, sample_token


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); the message says why."""


@dataclass
class Context:
    """What a finished request leaves in its session: tokens, KV of tokens[:kv_len], routing rows."""
    tokens: list[int]
    prompt_len: int
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    kv_len: int
    routing: np.ndarray | None  # rows for tokens[:kv_len]


@dataclass
class Session:
    capacity: int
    contexts: OrderedDict[str, Context] = field(default_factory=OrderedDict)

    def remember(self, rid: str, ctx: Context, max_contexts: int) -> None:
        """LRU: keep the most recent contexts and at most `capacity` tokens in all."""
        self.contexts[rid] = ctx
        self.contexts.move_to_end(rid)
        while len(self.contexts) > 1 and (len(self.contexts) > max_contexts or
                                          sum(len(c.tokens) for c in self.contexts.values()) > self.capacity):
            self.contexts.popitem(last=False)


@dataclass
class Sampling:
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_ids: set[int]
    ignore_eos: bool
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    no_stop_trim: bool
    generator: torch.Generator | None


@dataclass
class Request:
    rid: str
    tokens: list[int]  # full context so far: (session history +) prompt + sampled outputs
    prompt_len: int
    sampling: Sampling
    return_logprob: bool
    logprob_start_len: int
    return_routed_experts: bool
    routed_experts_start_len: int
    session_id: str | None
    top_logprobs_num: int = 0
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    kv_len: int = 0
    cached_tokens: int = 0
    routing: list[np.ndarray] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    aborted: bool = False
    future: asyncio.Future | None = None


def parse_sampling(params: dict[str, Any], eos_ids: set[int]) -> Sampling:
    """Implement SGLang's sampling keys we support; a key asking for anything else is refused."""
    neutral = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
               "n": 1, "stop": None, "stop_regex": None, "json_schema": None, "regex": None, "ebnf": None,
               "structural_tag": None, "custom_params": None, "logit_bias": None, "stream_interval": None}
    for key, value in params.items():
        if key in neutral and value not in (neutral[key], [], {}, "") and key != "stream_interval":
            raise RequestError(f"sampling_params.{key}={value!r} is not supported by the local HF server")
    temperature = float(params.get("temperature", 1.0))
    top_p = float(params.get("top_p", 1.0))
    top_k = int(params.get("top_k", -1))
    if temperature < 0 or not 0 < top_p <= 1 or top_k == 0 or top_k < -1:
        raise RequestError("sampling_params: need temperature >= 0, 0 < top_p <= 1, top_k == -1 or >= 1")
    max_new = int(params.get("max_new_tokens", 128) if params.get("max_new_tokens") is not None else 128)
    if max_new < 0:
        raise RequestError("sampling_params.max_new_tokens must be >= 0")
    seed = params.get("sampling_seed")
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    stop_ids = set(int(t) for t in (params.get("stop_token_ids") or []))
    ignore_eos = bool(params.get("ignore_eos", False))
    if not ignore_eos:
        stop_ids |= eos_ids
    return Sampling(max_new_tokens=max_new, min_new_tokens=int(params.get("min_new_tokens", 0) or 0),
                    temperature=temperature, top_p=top_p, top_k=top_k, stop_ids=stop_ids, ignore_eos=ignore_eos,
                    skip_special_tokens=bool(params.get("skip_special_tokens", True)),
                    spaces_between_special_tokens=bool(params.get("spaces_between_special_tokens", True)),
                    no_stop_trim=bool(params.get("no_stop_trim", False)), generator=gen)


class Scheduler:
    """Owns the model runner, the queues, the sessions and the one worker thread."""

    def __init__(self, runner: ModelRunner, *, max_batch_size: int, max_context_len: int,
                 max_session_contexts: int = 16, max_sessions: int = 1024) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_context_len = max_context_len
        self.max_session_contexts = max_session_contexts
        self.max_sessions = max_sessions
        self.pending: deque[Request] = deque()
        self.running: list[Request] = []
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.paused = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-model")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batched_requests_max = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def run_on_model(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model thread, i.e. between two forward steps, never during one."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.running)

    # ---- sessions
    def open_session(self, capacity: int, session_id: str | None) -> str:
        sid = session_id or uuid.uuid4().hex
        if sid in self.sessions:
            raise RequestError(f"session {sid!r} already exists")
        self.sessions[sid] = Session(capacity=max(int(capacity), self.max_context_len))
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return sid

    def close_session(self, sid: str) -> None:
        if self.sessions.pop(sid, None) is None:
            raise RequestError(f"unknown session {sid!r}")

    def drop_kv(self) -> None:
        """Forget cached KV (after a weight update or flush); tokens and routing stay for replay."""
        for session in self.sessions.values():
            for ctx in session.contexts.values():
                ctx.kv, ctx.kv_len = None, 0
                ctx.routing = None

    # ---- requests
    def submit(self, req: Request, session: dict[str, Any] | None, new_ids: list[int]) -> asyncio.Future:
        """Resolve the session context, check lengths, queue the request; the future gets the Request."""
        if session is not None:
            sid = session["id"]
            sess = self.sessions.get(sid)
            if sess is None:
                raise RequestError(f"unknown session {sid!r} (open it with /open_session)")
            if session.get("replace"):
                raise RequestError("session_params.replace is not supported by the local HF server")
            parent_rid = session.get("rid")
            if parent_rid is not None:
                parent = sess.contexts.get(parent_rid)
                if parent is None:
                    raise RequestError(f"session {sid!r} has no request {parent_rid!r} (unknown or evicted)")
                base = parent.tokens[:parent.prompt_len] if session.get("drop_previous_output") else parent.tokens
                req.tokens = list(base) + new_ids
                reuse = min(parent.kv_len, len(base), len(req.tokens) - 1) if parent.kv is not None else 0
                if req.return_logprob and req.logprob_start_len >= 0:
                    reuse = min(reuse, max(req.logprob_start_len - 1, 0))  # prompt logprobs need those logits
                if reuse > 0:
                    req.kv = [(k[:, :reuse], v[:, :reuse]) for k, v in parent.kv]
                    req.kv_len = reuse
                    if parent.routing is not None:
                        req.routing = [parent.routing[:reuse]]
                req.cached_tokens = reuse
            req.prompt_len = len(req.tokens)
            if not req.tokens:
                raise RequestError("input_ids: expected a non-empty prompt")
        if req.prompt_len + req.sampling.max_new_tokens > self.max_context_len:
            raise RequestError(f"prompt of {req.prompt_len} tokens + max_new_tokens {req.sampling.max_new_tokens} "
                               f"exceeds the server's --max-context-len {self.max_context_len}")
        if req.return_logprob and req.logprob_start_len >= req.prompt_len:
            raise RequestError(f"logprob_start_len {req.logprob_start_len} must be < prompt length {req.prompt_len}")
        if req.return_routed_experts and not 0 <= req.routed_experts_start_len < max(req.prompt_len, 1):
            raise RequestError("routed_experts_start_len must be in [0, prompt length)")
        req.future = asyncio.get_running_loop().create_future()
        self.pending.append(req)
        self._wake.set()
        return req.future

    def abort(self, rid: str | None = None, all_requests: bool = False) -> int:
        n = 0
        for req in list(self.pending) + self.running:
            if all_requests or req.rid == rid:
                req.aborted = True
                n += 1
        for req in list(self.pending):  # never started: finish now with empty output
            if req.aborted:
                self.pending.remove(req)
                self._finish(req, {"type": "abort"})
        self._wake.set()
        return n

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    def _finish(self, req: Request, reason: dict[str, Any]) -> None:
        req.finish = reason
        if req.session_id is not None and req.session_id in self.sessions:
            routing = np.concatenate(req.routing) if req.routing else None
            self.sessions[req.session_id].remember(req.rid, Context(
                tokens=list(req.tokens), prompt_len=req.prompt_len, kv=req.kv, kv_len=req.kv_len,
                routing=routing), self.max_session_contexts)
        if req.future is not None and not req.future.done():
            req.future.set_result(req)

    async def _loop(self) -> None:
        while True:
            for req in [r for r in self.running if r.aborted]:  # also while paused (pause mode abort)
                self.running.remove(req)
                self._finish(req, {"type": "abort"})
            if self.paused or not (self.pending or self.running):
                self._wake.clear()
                await self._wake.wait()
                continue
            while self.pending and len(self.running) < self.max_batch_size:
                self.running.append(self.pending.popleft())
            if not self.running:
                continue
            batch = list(self.running)
            self.batched_requests_max = max(self.batched_requests_max, len(batch))
            try:
                await self.run_on_model(lambda: self._step(batch))
            except Exception as e:  # a failing forward fails its requests, not the server
                for req in batch:
                    if req in self.running:
                        self.running.remove(req)
                    if req.future is not None and not req.future.done():
                        req.future.set_exception(e)
                continue
            for req in batch:
                if req.finish is None and req in self.running and self._check_done(req):
                    self.running.remove(req)
                    self._finish(req, req.finish)  # type: ignore[arg-type]
            await asyncio.sleep(0)  # let HTTP handlers (abort, new requests) in between steps

    def _step(self, batch: list[Request]) -> None:
        """Model thread: one forward for the batch, then sample one token per request."""
        inputs = [StepInput(kv=r.kv, kv_len=r.kv_len, new_ids=r.tokens[r.kv_len:],
                            want_prompt_logits=r.return_logprob and r.logprob_start_len >= 0 and r.kv_len < r.prompt_len,
                            temperature=r.sampling.temperature) for r in batch]
        outs = self.runner.step(inputs)
        for req, x, out in zip(batch, inputs, outs):
            start = req.kv_len
            req.kv, req.kv_len = out.kv, start + len(x.new_ids)
            if out.routing is not None:
                req.routing.append(out.routing)
            if out.fed_logprobs is not None:
                self._prompt_logprobs(req, start, x.new_ids, out.fed_logprobs)
            if req.sampling.max_new_tokens == 0:
                continue
            s = req.sampling
            banned = sorted(s.stop_ids) if len(req.output_ids) < s.min_new_tokens else []
            tok = sample_token(out.last_logits, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                               generator=s.generator, banned=banned)
            req.output_ids.append(tok)
            req.output_logprobs.append(float(out.last_logprobs[tok]))
            if req.top_logprobs_num > 0:
                req.output_top_logprobs.append(_top_k(out.last_logprobs, req.top_logprobs_num))
            req.tokens.append(tok)

    def _prompt_logprobs(self, req: Request, start: int, new_ids: list[int], fed: torch.Tensor) -> None:
        """Logprob of prompt token p comes from the row of position p-1 (position 0 has none)."""
        if req.input_logprobs is None:
            req.input_logprobs = [None] * req.prompt_len
            if req.top_logprobs_num > 0:
                req.input_top_logprobs = [None] * req.prompt_len
        for j in range(len(new_ids)):
            p = start + j + 1
            if p < req.prompt_len:
                req.input_logprobs[p] = float(fed[j, req.tokens[p]])
                if req.input_top_logprobs is not None:
                    req.input_top_logprobs[p] = _top_k(fed[j], req.top_logprobs_num)

    def _check_done(self, req: Request) -> bool:
        s = req.sampling
        if s.max_new_tokens == 0:
            req.finish = {"type": "length", "length": 0}
        elif req.output_ids and req.output_ids[-1] in s.stop_ids and len(req.output_ids) > s.min_new_tokens - 1:
            req.finish = {"type": "stop", "matched": req.output_ids[-1]}
        elif len(req.output_ids) >= s.max_new_tokens:
            req.finish = {"type": "length", "length": s.max_new_tokens}
        return req.finish is not None


def _top_k(logprobs: torch.Tensor, k: int) -> list[tuple[float, int]]:
    """The k most likely tokens of one position as (logprob, token_id), most likely first (SGLang's order)."""
    values, ids = torch.topk(logprobs.float(), min(k, logprobs.shape[-1]))
    return list(zip(values.tolist(), ids.tolist()))

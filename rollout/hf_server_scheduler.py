"""The batching scheduler of the local HF server (its requests and sessions: rollout/hf_server_request.py).

The scheduler is one asyncio task: it admits pending requests up to --max-batch-size, hands one
step to a single worker thread, and finishes requests on stop/length/abort. As SGLang's scheduler
does by default (no --enable-mixed-chunk), a step is either one prefill forward of the requests that
have input to take in (new prompts, resent contexts) or one decode forward of all the others. The event loop stays free for HTTP
(abort, health, pause) while the model runs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from rollout.hf_server_batch_kv import own_kv
from rollout.hf_server_model import ModelRunner, StepInput, StepOutput
from rollout.hf_server_request import (
    Context,
    EngineDead,
    Request,
    Sampling,
    Session,
    build_sampling,
    parse_sampling,
)
from rollout.hf_server_sampling import NO_MASS, RowSampling, sample_tokens
from rollout.hf_server_validation import RequestError
from rollout.sglang_api import SessionParams

log = logging.getLogger(__name__)

__all__ = ["Context", "EngineDead", "Request", "RequestError", "Sampling", "Scheduler", "Session", "build_sampling",
           "parse_sampling"]


class Scheduler:
    """Owns the model runner, the queues, the sessions and the one worker thread."""

    def __init__(self, runner: ModelRunner, *, max_batch_size: int, max_context_len: int,
                 max_session_contexts: int = 16, max_sessions: int = 1024, speculative: Any = None) -> None:
        self.runner = runner
        self.speculative = speculative  # hf_server_speculative.SpeculativeDecoder, or None
        self.hidden_limit = runner.mtp.receptive_field() if getattr(runner, "mtp", None) is not None else 0
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
        self.failure: str | None = None  # why the loop stopped, once it has

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._task.add_done_callback(self._loop_done)

    @property
    def alive(self) -> bool:
        """False once the loop task has ended for any reason: the server cannot generate any more."""
        return self._task is not None and not self._task.done() and self.failure is None

    async def stop(self) -> None:
        self.failure = self.failure or "stopped"
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
            raise RequestError(f"field `session_id`: session {sid!r} already exists")
        self.sessions[sid] = Session(capacity=max(int(capacity), self.max_context_len))
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return sid

    def close_session(self, sid: str) -> None:
        if self.sessions.pop(sid, None) is None:
            raise RequestError(f"field `session_id`: unknown session {sid!r}")

    def drop_kv(self) -> None:
        """Forget cached KV (after a weight update or flush); tokens and routing stay for replay."""
        for session in self.sessions.values():
            for ctx in session.contexts.values():
                ctx.kv, ctx.kv_len = None, 0
                ctx.routing = None
                ctx.hidden = None

    # ---- requests
    def submit(self, req: Request, session: SessionParams | None, new_ids: list[int]) -> asyncio.Future:
        """Resolve the session context, check lengths, queue the request; the future gets the Request.

        Everything that can be wrong with a request is found here or earlier (`hf_server_validation`),
        so nothing a client sends can raise inside the scheduler loop.
        """
        if self.failure is not None:
            raise EngineDead(f"the scheduler loop has stopped ({self.failure}); restart the server")
        if req.rid is not None and any(r.rid == req.rid for r in [*self.pending, *self.running]):
            raise RequestError(f"field `rid`: request {req.rid!r} is already in flight (SGLang refuses a "
                               "duplicate request ID the same way)")
        if session is not None:
            sid = session.id
            sess = self.sessions.get(sid)
            if sess is None:
                raise RequestError(f"field `session_params.id`: unknown session {sid!r} (open it with /open_session)")
            if session.replace:
                raise RequestError("field `session_params.replace`: not supported by the local HF server")
            parent_rid = session.rid
            if parent_rid is not None:
                parent = sess.contexts.get(parent_rid)
                if parent is None:
                    raise RequestError(f"field `session_params.rid`: session {sid!r} has no request {parent_rid!r} "
                                       "(unknown or evicted)")
                base = parent.tokens[:parent.prompt_len] if session.drop_previous_output else parent.tokens
                req.tokens = list(base) + new_ids
                reuse = min(parent.kv_len, len(base), len(req.tokens) - 1) if parent.kv is not None else 0
                if req.return_logprob and req.logprob_start_len >= 0:
                    reuse = min(reuse, max(req.logprob_start_len - 1, 0))  # prompt logprobs need those logits
                if reuse > 0:
                    req.kv = [(k[:, :reuse], v[:, :reuse]) for k, v in parent.kv]
                    req.kv_len = reuse
                    if parent.routing is not None:
                        req.routing = [parent.routing[:reuse]]
                    if parent.hidden is not None and parent.kv_len - parent.hidden.shape[0] < reuse:
                        req.hidden = parent.hidden[:parent.hidden.shape[0] - (parent.kv_len - reuse)]
                req.cached_tokens = reuse
            req.prompt_len = len(req.tokens)
            if not req.tokens:
                raise RequestError("field `input_ids`: expected a non-empty prompt")
        if req.prompt_len + req.sampling.max_new_tokens > self.max_context_len:
            raise RequestError(f"fields `input_ids` + `sampling_params.max_new_tokens`: prompt of {req.prompt_len} "
                               f"tokens + max_new_tokens {req.sampling.max_new_tokens} exceeds the server's "
                               f"--max-context-len {self.max_context_len}")
        if req.return_logprob and req.logprob_start_len >= req.prompt_len:
            raise RequestError(f"field `logprob_start_len`: expected -1 or an integer < the prompt length "
                               f"{req.prompt_len}, got {req.logprob_start_len}")
        if req.return_routed_experts and not 0 <= req.routed_experts_start_len < max(req.prompt_len, 1):
            raise RequestError(f"field `routed_experts_start_len`: expected an integer in [0, {req.prompt_len}) "
                               f"(the prompt length), got {req.routed_experts_start_len}")
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
        try:
            if req.session_id is not None and req.session_id in self.sessions:
                routing = np.concatenate(req.routing) if req.routing else None
                self.sessions[req.session_id].remember(req.rid, Context(
                    tokens=list(req.tokens), prompt_len=req.prompt_len, kv=own_kv(req.kv), kv_len=req.kv_len,
                    routing=routing, hidden=req.hidden), self.max_session_contexts)
        except Exception:
            log.exception("could not remember request %r in session %r", req.rid, req.session_id)
        if req.future is not None and not req.future.done():
            req.future.set_result(req)

    def _fail(self, req: Request, error: BaseException) -> None:
        """Take one request out of the queues and give its caller the error; the others go on."""
        req.aborted = True
        if req in self.running:
            self.running.remove(req)
        if req in self.pending:
            self.pending.remove(req)
        if req.future is not None and not req.future.done():
            req.future.set_exception(error)

    def _loop_done(self, task: asyncio.Task) -> None:
        """Record why the loop ended (health then answers 503) and fail whoever still waits."""
        if task.cancelled():
            self.failure = self.failure or "cancelled"
            for req in list(self.pending) + list(self.running):
                self._fail(req, EngineDead(f"the scheduler loop has stopped ({self.failure})"))
            return
        err = task.exception()
        self.failure = f"{type(err).__name__}: {err}" if err is not None else "returned"
        log.error("scheduler loop ended: %s", self.failure)
        for req in list(self.pending) + list(self.running):
            self._fail(req, EngineDead(f"the scheduler loop has stopped ({self.failure})"))

    async def _loop(self) -> None:
        while True:
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("scheduler step failed; failing the running requests")
                for req in list(self.running):
                    self._fail(req, e)
                await asyncio.sleep(0.01)  # never spin without yielding to the HTTP handlers

    async def _iteration(self) -> None:
        for req in [r for r in self.running if r.aborted]:  # also while paused (pause mode abort)
            self.running.remove(req)
            self._finish(req, {"type": "abort"})
        if self.paused or not (self.pending or self.running):
            self._wake.clear()
            await self._wake.wait()
            return
        while self.pending and len(self.running) < self.max_batch_size:
            self.running.append(self.pending.popleft())
        if not self.running:
            return
        batch = self._next_forward()
        self.batched_requests_max = max(self.batched_requests_max, len(batch))
        failed = await self.run_on_model(lambda: self._step(batch))
        for req, err in failed:
            self._fail(req, err)
        for req in batch:
            if req.finish is None and req in self.running and self._check_done(req):
                self.running.remove(req)
                self._finish(req, req.finish)  # type: ignore[arg-type]
        await asyncio.sleep(0)  # let HTTP handlers (abort, new requests) in between steps

    def _next_forward(self) -> list[Request]:
        """Prefill first, alone (SGLang's `get_next_batch_to_run` order), else decode everyone.

        A prefill in the decodes' forward would pad every decode to the prompt's width
        (`ModelRunner.step` pads a step to its longest input): a 50-token prompt joining 63 decodes
        costs ~10x a pure decode step on CPU (benchmarks/scheduler/forward_cost.py).
        """
        extend = [r for r in self.running if len(r.tokens) - r.kv_len > 1]
        return extend or list(self.running)

    def _step(self, batch: list[Request]) -> list[tuple[Request, Exception]]:
        """Model thread: one forward for the batch, then sample one token per request.

        Returns the requests that failed. A failing batched forward is retried one request at a
        time, so only the offending request fails and the others advance by their token.
        """
        if self.speculative is not None:
            return self.speculative.step(self, batch)
        inputs = [StepInput(kv=r.kv, kv_len=r.kv_len, new_ids=r.tokens[r.kv_len:],
                            want_prompt_logits=r.return_logprob and r.logprob_start_len >= 0 and r.kv_len < r.prompt_len,
                            temperature=r.sampling.temperature) for r in batch]
        try:
            outs = self.runner.step(inputs)
        except Exception as e:
            if len(batch) == 1:
                log.exception("forward failed for request %r", batch[0].rid)
                return [(batch[0], e)]
            return [f for req in batch for f in self._step([req])]
        failed: list[tuple[Request, Exception]] = []
        drawing: list[tuple[Request, StepOutput]] = []
        for req, x, out in zip(batch, inputs, outs):
            try:
                self._take(req, x, out)
            except Exception as e:
                log.exception("reading the step's output failed for request %r", req.rid)
                failed.append((req, e))
                continue
            if req.sampling.max_new_tokens > 0:
                drawing.append((req, out))
        return failed + self._sample(drawing)

    def _advance(self, req: Request, x: StepInput, out: StepOutput) -> None:
        """One request's whole step on its own (speculative decoding's undrafted requests)."""
        self._take(req, x, out)
        if req.sampling.max_new_tokens > 0:
            for _, error in self._sample([(req, out)]):
                raise error

    def _take(self, req: Request, x: StepInput, out: StepOutput) -> None:
        """Take one request's step output: its cache, routing and prompt logprobs."""
        start = req.kv_len
        req.kv, req.kv_len = out.kv, start + len(x.new_ids)
        if out.hidden is not None and self.hidden_limit:
            tail = out.hidden[-self.hidden_limit:]
            req.hidden = tail if req.hidden is None else torch.cat([req.hidden, tail])[-self.hidden_limit:]
        if out.routing is not None:
            req.routing.append(out.routing)
        if out.fed_logprobs is not None:
            self._prompt_logprobs(req, start, x.new_ids, out.fed_logprobs)

    def _sample(self, drawing: list[tuple[Request, StepOutput]]) -> list[tuple[Request, Exception]]:
        """Every request's next token in one batched draw (rollout/hf_server_sampling.py); returns the failed."""
        if not drawing:
            return []
        rows = [RowSampling(r.sampling.temperature, r.sampling.top_p, r.sampling.top_k, r.sampling.generator,
                            sorted(r.sampling.stop_ids) if len(r.output_ids) < r.sampling.min_new_tokens else [])
                for r, _ in drawing]
        tokens = sample_tokens(torch.stack([out.last_logits for _, out in drawing]), rows)
        failed: list[tuple[Request, Exception]] = []
        for (req, out), tok in zip(drawing, tokens):
            if tok is None:
                log.error("sampling failed for request %r: no probability mass", req.rid)
                failed.append((req, ValueError(NO_MASS)))
                continue
            req.output_ids.append(tok)
            req.output_logprobs.append(float(out.last_logprobs[tok]))
            if req.top_logprobs_num > 0:
                req.output_top_logprobs.append(_top_k(out.last_logprobs, req.top_logprobs_num)[0])
            req.tokens.append(tok)
        return failed

    def _prompt_logprobs(self, req: Request, start: int, new_ids: list[int], fed: torch.Tensor) -> None:
        """Logprob of prompt token p comes from the row of position p-1 (position 0 has none)."""
        if req.input_logprobs is None:
            req.input_logprobs = [None] * req.prompt_len
            if req.top_logprobs_num > 0:
                req.input_top_logprobs = [None] * req.prompt_len
        m = min(len(new_ids), req.prompt_len - start - 1)  # fed rows j whose next position p = start+j+1 is a prompt token
        if m <= 0:
            return
        targets = torch.tensor(req.tokens[start + 1:start + 1 + m], dtype=torch.long)
        req.input_logprobs[start + 1:start + 1 + m] = fed[torch.arange(m), targets].tolist()
        if req.input_top_logprobs is not None:
            req.input_top_logprobs[start + 1:start + 1 + m] = _top_k(fed[:m], req.top_logprobs_num)

    def _check_done(self, req: Request) -> bool:
        s = req.sampling
        if s.max_new_tokens == 0:
            req.finish = {"type": "length", "length": 0}
        elif req.output_ids and req.output_ids[-1] in s.stop_ids and len(req.output_ids) > s.min_new_tokens - 1:
            req.finish = {"type": "stop", "matched": req.output_ids[-1]}
        elif len(req.output_ids) >= s.max_new_tokens:
            req.finish = {"type": "length", "length": s.max_new_tokens}
        return req.finish is not None


def _top_k(logprobs: torch.Tensor, k: int) -> list[list[tuple[float, int]]]:
    """Per row of `logprobs` ([vocab] or [rows, vocab]) its k most likely tokens as (logprob, token_id), most
    likely first (SGLang's order)."""
    rows = logprobs.float().reshape(-1, logprobs.shape[-1])
    values, ids = torch.topk(rows, min(k, rows.shape[-1]), dim=-1)
    return [list(zip(v, i)) for v, i in zip(values.tolist(), ids.tolist())]

"""A local engine that speaks SGLang's native HTTP API, on HF transformers (CPU or GPU).

    python -m rollout.transformers_server --model-path P --port N [--enable-return-routed-experts]

It serves the subset of SGLang's API that mopd uses (rollout/sglang_api.py), so the same client,
manager and trainer weight push run against it as against SGLang. Concurrent /generate requests
with the same sampling settings are decoded as one batch; a session turn runs alone because it
reuses its conversation's KV cache (only the new tokens are prefilled).

Deviations from SGLang, all answered with HTTP 400 rather than ignored: `text` prompts, streaming,
n > 1, constrained decoding (regex/json_schema/ebnf), penalties, session `offset`/`replace`/
`drop_previous_output`, and NCCL weight updates. `/update_weights_from_tensor` takes
`load_format: "safetensors"` (each entry base64 of safetensors bytes of HF-named tensors):
SGLang's default serializer passes CUDA IPC handles, which cannot cross processes on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from aiohttp import web
from safetensors.torch import load as safetensors_load

from rollout.hf_model_runner import Job, ModelRunner
from rollout.sglang_api import GenerateRequest, ProtocolError, encode_routed_experts, logprob_entries

log = logging.getLogger("mopd.transformers_server")
SUPPORTED_SAMPLING = {"max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids",
                      "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                      "sampling_seed", "n"}
MAX_SESSION_TURNS_KEPT = 2


@dataclass
class Turn:
    """What a session keeps of one finished request: its tokens, KV cache and routing rows."""

    tokens: list[int]
    cache: Any
    rows: np.ndarray | None


class Engine:
    def __init__(self, runner: ModelRunner, *, max_batch_size: int, max_context_len: int,
                 max_sessions: int = 4096) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_context_len = max_context_len
        self.max_sessions = max_sessions
        self.weight_version = "0"
        self.queue: list[tuple[Job, asyncio.Future]] = []
        self.running: dict[str, Job] = {}
        self.sessions: OrderedDict[str, OrderedDict[str, Turn]] = OrderedDict()
        self.wakeup = asyncio.Event()
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    # --- scheduling -----------------------------------------------------------------------------
    async def scheduler(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            await self.resumed.wait()
            if not self.queue:
                self.wakeup.clear()
                continue
            batch = self._next_batch()
            try:
                await loop.run_in_executor(self.executor, self.runner.run, [job for job, _ in batch])
            except Exception as e:  # noqa: BLE001 - the requests fail, the server stays up
                log.exception("batch failed")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
            finally:
                for job, _ in batch:
                    self.running.pop(job.rid, None)

    def _next_batch(self) -> list[tuple[Job, asyncio.Future]]:
        first = self.queue.pop(0)
        batch = [first]
        if not (first[0].keep_cache or first[0].cache is not None):
            key = _batch_key(first[0])
            rest = []
            for item in self.queue:
                if len(batch) < self.max_batch_size and not item[0].keep_cache and item[0].cache is None \
                        and _batch_key(item[0]) == key:
                    batch.append(item)
                else:
                    rest.append(item)
            self.queue = rest
        for job, _ in batch:
            self.running[job.rid] = job
        return batch

    async def submit(self, job: Job) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((job, fut))
        self.wakeup.set()
        await fut

    def abort(self, rid: str | None) -> int:
        """Mark requests aborted; queued ones finish at once with empty output, running ones at the next token."""
        hits = 0
        for job, fut in list(self.queue):
            if rid is None or job.rid == rid:
                job.aborted.set()
                job.finish = {"type": "abort"}
                self.queue.remove((job, fut))
                fut.set_result(None)
                hits += 1
        for job in self.running.values():
            if rid is None or job.rid == rid:
                job.aborted.set()
                hits += 1
        return hits

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    # --- requests -------------------------------------------------------------------------------
    def make_job(self, req: GenerateRequest) -> tuple[Job, str | None]:
        params = req.sampling_params
        unsupported = sorted(set(params) - SUPPORTED_SAMPLING)
        if unsupported:
            raise ProtocolError(f"sampling_params: {unsupported} not supported by the local server")
        if int(params.get("n", 1)) != 1:
            raise ProtocolError("sampling_params.n: only n=1 is supported by the local server")
        if req.stream:
            raise ProtocolError("stream: streaming is not supported by the local server")
        max_new = int(params.get("max_new_tokens", 128))
        if max_new < 0:
            raise ProtocolError(f"sampling_params.max_new_tokens: expected >= 0, got {max_new}")
        context, cache, cached, prior = list(req.input_ids), None, 0, None
        session_id = None
        if req.session_params is not None:
            sp = req.session_params
            if sp.offset is not None or sp.replace or sp.drop_previous_output:
                raise ProtocolError("session_params: offset/replace/drop_previous_output are not supported "
                                    "by the local server")
            if sp.id not in self.sessions:
                raise ProtocolError(f"session_params.id: unknown session {sp.id!r} (open it with /open_session)")
            session_id = sp.id
            self.sessions.move_to_end(sp.id)
            if sp.rid is not None:
                turn = self.sessions[sp.id].get(sp.rid)
                if turn is None:
                    raise ProtocolError(f"session_params.rid: {sp.rid!r} is not a (recent) request of session {sp.id}")
                context = turn.tokens + context
                if turn.cache is not None:
                    cache, cached, prior = turn.cache, len(turn.tokens) - 1, turn.rows
        if not context:
            raise ProtocolError("input_ids: expected a non-empty prompt")
        if len(context) + max_new > self.max_context_len:
            raise ProtocolError(f"input_ids: prompt of {len(context)} tokens + max_new_tokens {max_new} exceeds the "
                                f"context length {self.max_context_len}")
        if req.logprob_start_len >= len(context):
            raise ProtocolError(f"logprob_start_len: expected < prompt length {len(context)}, got {req.logprob_start_len}")
        job = Job(context=context, max_new_tokens=max_new, sampling=dict(params),
                  logprob_start_len=req.logprob_start_len if req.return_logprob else -1, cache=cache,
                  cached=cached, prior_rows=prior, keep_cache=session_id is not None)
        job.rid = req.rid or uuid.uuid4().hex
        return job, session_id

    def remember(self, session_id: str, job: Job) -> None:
        turns = self.sessions[session_id]
        turns[job.rid] = Turn(job.context + job.output_ids, job.new_cache, job.rows)
        while len(turns) > MAX_SESSION_TURNS_KEPT:
            turns.popitem(last=False)

    def drop_caches(self) -> None:
        for turns in self.sessions.values():
            for turn in turns.values():
                turn.cache = None


def _batch_key(job: Job) -> tuple:
    s = job.sampling
    return (float(s.get("temperature", 1.0)), float(s.get("top_p", 1.0)), int(s.get("top_k", -1)),
            tuple(sorted(s.get("stop_token_ids") or [])), bool(s.get("ignore_eos")), s.get("sampling_seed"),
            int(s.get("min_new_tokens", 0)), job.max_new_tokens == 0)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def build_app(engine: Engine) -> web.Application:
    routes = web.RouteTableDef()
    runner = engine.runner

    @routes.post("/generate")
    async def generate(request: web.Request) -> web.Response:
        try:
            req = GenerateRequest.from_json(await request.json())
            job, session_id = engine.make_job(req)
        except (ProtocolError, ValueError, TypeError) as e:
            return _error(400, str(e))
        await engine.submit(job)
        if req.return_logprob and job.logprob_start_len >= 0 and job.max_new_tokens > 0 and not job.aborted.is_set():
            scoring = Job(context=job.context, max_new_tokens=0, sampling={}, logprob_start_len=job.logprob_start_len)
            scoring.rid = uuid.uuid4().hex
            await engine.submit(scoring)
            job.input_logprobs = scoring.input_logprobs
        if session_id is not None and session_id in engine.sessions:
            engine.remember(session_id, job)
        return web.json_response(_response(engine, req, job))

    @routes.post("/abort_request")
    async def abort_request(request: web.Request) -> web.Response:
        body = await request.json()
        rid = None if body.get("abort_all") else body.get("rid")
        if rid is None and not body.get("abort_all"):
            return _error(400, "abort_request: expected `rid` or `abort_all: true`")
        return web.json_response({"success": True, "aborted": engine.abort(rid)})

    @routes.post("/pause_generation")
    async def pause(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        mode = body.get("mode", "abort")
        if mode not in ("abort", "in_place", "retract"):
            return _error(400, f"mode: expected abort, in_place or retract, got {mode!r}")
        engine.resumed.clear()
        if mode == "abort":
            engine.abort(None)
        return web.json_response({"success": True})

    @routes.post("/continue_generation")
    async def resume(request: web.Request) -> web.Response:
        engine.resumed.set()
        return web.json_response({"success": True})

    @routes.post("/flush_cache")
    async def flush_cache(request: web.Request) -> web.Response:
        if engine.busy:
            return _error(400, "flush_cache: requests are running or pending; retry when idle")
        engine.drop_caches()
        return web.json_response({"success": True})

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @routes.route("*", "/health_generate")
    async def health_generate(request: web.Request) -> web.Response:
        job = Job(context=[runner.pad_id], max_new_tokens=1, sampling={"temperature": 0.0, "ignore_eos": True})
        job.rid = uuid.uuid4().hex
        await engine.submit(job)
        return web.Response(text="ok")

    @routes.get("/model_info")
    async def model_info(request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": runner.model_path, "tokenizer_path": runner.model_path, "is_generation": True,
            "weight_version": engine.weight_version, "num_hidden_layers": runner.num_layers,
            "num_experts_per_tok": runner.recorder.top_k, "vocab_size": int(runner.model.config.vocab_size),
            "max_context_len": engine.max_context_len, "routed_experts_enabled": runner.capture_routing,
            "num_forward_steps": runner.forward_calls})

    @routes.post("/update_weights_from_disk")
    async def update_from_disk(request: web.Request) -> web.Response:
        body = await request.json()
        if "model_path" not in body:
            return _error(400, "update_weights_from_disk: expected `model_path`")
        try:
            await asyncio.get_running_loop().run_in_executor(None, runner.load_from_disk, body["model_path"])
        except (OSError, ValueError) as e:
            return web.json_response({"success": False, "message": str(e)}, status=400)
        return web.json_response(_weights_updated(engine, body, "loaded " + body["model_path"]))

    @routes.post("/update_weights_from_tensor")
    async def update_from_tensor(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("load_format") != "safetensors":
            return _error(400, "load_format: this server takes only 'safetensors' (base64 safetensors bytes); "
                               "SGLang's default CUDA-IPC serializer cannot cross processes on CPU")
        try:
            named: dict[str, torch.Tensor] = {}
            for entry in body.get("serialized_named_tensors") or []:
                named.update(safetensors_load(base64.b64decode(entry)))
            count = await asyncio.get_running_loop().run_in_executor(None, runner.load_tensors, named)
        except (ValueError, TypeError) as e:
            return web.json_response({"success": False, "message": str(e)}, status=400)
        return web.json_response(_weights_updated(engine, body, f"updated {count} tensors"))

    @routes.post("/init_weights_update_group")
    @routes.post("/update_weights_from_distributed")
    async def distributed(request: web.Request) -> web.Response:
        return _error(400, "weight updates over NCCL are not supported by the local server (GPU clusters only)")

    @routes.post("/open_session")
    async def open_session(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        sid = body.get("session_id") or uuid.uuid4().hex
        engine.sessions[sid] = OrderedDict()
        while len(engine.sessions) > engine.max_sessions:
            engine.sessions.popitem(last=False)
        return web.json_response(sid)

    @routes.post("/close_session")
    async def close_session(request: web.Request) -> web.Response:
        body = await request.json()
        engine.sessions.pop(body.get("session_id"), None)
        return web.json_response({"success": True})

    app = web.Application(client_max_size=1 << 30)
    app.add_routes(routes)

    async def start_scheduler(app: web.Application) -> None:
        app["scheduler"] = asyncio.create_task(engine.scheduler())

    async def stop_scheduler(app: web.Application) -> None:
        app["scheduler"].cancel()
        engine.executor.shutdown(wait=False, cancel_futures=True)

    app.on_startup.append(start_scheduler)
    app.on_cleanup.append(stop_scheduler)
    return app


def _weights_updated(engine: Engine, body: dict, message: str) -> dict:
    if body.get("weight_version") is not None:
        engine.weight_version = str(body["weight_version"])
    engine.drop_caches()  # session KV caches hold activations of the old weights
    return {"success": True, "message": message}


def _response(engine: Engine, req: GenerateRequest, job: Job) -> dict[str, Any]:
    out = job.output_ids
    meta: dict[str, Any] = {
        "id": job.rid, "finish_reason": job.finish or {"type": "abort"}, "prompt_tokens": len(job.context),
        "completion_tokens": len(out), "cached_tokens": job.cached, "weight_version": engine.weight_version}
    if req.return_logprob:
        meta["output_token_logprobs"] = logprob_entries(job.output_logprobs, out)
        if job.logprob_start_len >= 0:
            meta["input_token_logprobs"] = logprob_entries(job.input_logprobs,
                                                           job.context[job.logprob_start_len:])
    if req.return_routed_experts and engine.runner.capture_routing and job.rows is not None:
        meta["routed_experts"] = encode_routed_experts(job.rows[req.routed_experts_start_len:])
    skip = bool(req.sampling_params.get("skip_special_tokens", True))
    return {"text": engine.runner.tokenizer.decode(out, skip_special_tokens=skip), "output_ids": out,
            "meta_info": meta}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollout.transformers_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--enable-return-routed-experts", action="store_true")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-context-len", type=int, default=4096)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.num_threads)
    runner = ModelRunner(args.model_path, device=args.device, dtype=args.dtype,
                         capture_routing=args.enable_return_routed_experts)
    engine = Engine(runner, max_batch_size=args.max_batch_size, max_context_len=args.max_context_len)
    web.run_app(build_app(engine), host=args.host, port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()

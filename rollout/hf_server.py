"""A local server that speaks SGLang's native HTTP API on top of HF transformers (CPU or one GPU).

It lets rollout, teacher scoring, routing replay (R3) and weight sync run end to end on a machine
without SGLang: same endpoints, same request parsing (`rollout.sglang_api`), same response shapes.
Requests are batched continuously (see `hf_server_scheduler` and `hf_server_model`).
MiMo-V2-Flash checkpoints load with their MTP layers (`rollout.mtp`, updated by weight pushes too),
and `--speculative-algorithm EAGLE --speculative-num-steps K` (SGLang's flags) turns on MTP
self-speculative decoding (`hf_server_speculative`): same greedy output, same sampling distribution,
target-model logprobs and routed experts, SGLang's `spec_*` fields in `meta_info`.

Deviations from SGLang, on purpose:
- `/update_weights_from_tensor` only takes `load_format: "safetensors"` (each entry base64 of
  `safetensors.torch.save` bytes). SGLang's default serializer passes CUDA-IPC handles, which
  cannot cross processes on CPU, so it is refused with HTTP 400.
- `/init_weights_update_group` and `/update_weights_from_distributed` (NCCL) answer HTTP 400.
- `/begin_weight_update` .. `/end_weight_update` open and close the session outside which SGLang refuses
  tensor updates, as SGLang does; the `selector` is checked but the draft (MTP) layers live in the same
  model here, so every update reaches both.
- Prompts are token ids only (`text` is refused by the protocol layer); `stream` is refused.
- Stricter input checks than SGLang (see `hf_server_validation`): exact JSON types, token ids in
  [0, vocab), one string `rid`, and pushed weights must be finite (SGLang loads NaN silently).
- Sampling keys that change the distribution and are not implemented (penalties, min_p, regex,
  json_schema, stop strings, n > 1, logit_bias...) are refused with HTTP 400 naming the key.

Bad input is an HTTP 400 whose message names the field (`hf_server_validation` checks every
request before it reaches the scheduler), a body over --max-request-bytes is a 413, and a
rejected weight update changes no weight. A failure inside one generation step fails only the
requests it belongs to; if the scheduler loop itself ever stops, /health and /health_generate
answer 503 so that whoever supervises the server restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from aiohttp import web

from rollout import hf_server_speculative as speculative
from rollout import hf_server_validation as check
from rollout.hf_server_model import ModelRunner
from rollout.hf_server_scheduler import (
    EngineDead,
    Request,
    RequestError,
    Sampling,
    Scheduler,
    build_sampling,
    parse_sampling,
)
from rollout.sglang_api import GenerateRequest, encode_routed_experts, logprob_entries, top_logprob_entries

NCCL_MESSAGE = "not supported by the local server (NCCL, GPU clusters only)"
DEFAULT_MAX_REQUEST_BYTES = 256 << 20  # a weight update by tensor of a small model, or a long prompt
PARSE_IN_THREAD_BYTES = 1 << 20
log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    """A request body over --max-request-bytes (HTTP 413)."""


def _error(message: str, status: int = 400) -> web.Response:
    """SGLang's error shapes at once: `error.message` (generate) and `success`/`message` (weights)."""
    return web.json_response({"success": False, "message": message, "error": {"message": message}}, status=status)


@web.middleware
async def _error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    """Map refusals to 400/413/503 with a JSON message; anything else is a logged 500, never a dead handler."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except BodyTooLarge as e:
        return _error(str(e), status=413)
    except RequestError as e:
        return _error(str(e))
    except EngineDead as e:
        return _error(str(e), status=503)
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return _error(f"internal error: {type(e).__name__}: {e}", status=500)


class HFServer:
    """HTTP handlers; all model work goes through the scheduler's single worker thread."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runner = ModelRunner.load(args.model_path, device=args.device, dtype=args.dtype,
                                       capture_routing=args.enable_return_routed_experts)
        self.model_path = args.model_path
        self.weight_version = args.weight_version
        self.update_session: str | None = None  # the selector of the open /begin_weight_update session
        self.tokenizer = _load_tokenizer(args.model_path)
        self.eos_ids = _eos_ids(self.runner.model)
        self.vocab_size = self.runner.vocab_size
        self.scheduler: Scheduler | None = None
        k = speculative.num_steps(args)  # a checkpoint without MTP layers fails here, before serving
        self.speculative = speculative.SpeculativeDecoder(self.runner, k) if k else None

    @property
    def sched(self) -> Scheduler:
        assert self.scheduler is not None
        return self.scheduler

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.args.max_request_bytes, middlewares=[_error_middleware])
        r = app.router
        r.add_post("/generate", self.generate)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        r.add_post("/health_generate", self.health_generate)
        r.add_get("/model_info", self.model_info)
        r.add_get("/get_model_info", self.model_info)
        r.add_get("/metrics", self.metrics)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/flush_cache", self.flush_cache)
        r.add_get("/flush_cache", self.flush_cache)
        r.add_post("/open_session", self.open_session)
        r.add_post("/close_session", self.close_session)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_post("/update_weights_from_tensor", self.update_weights_from_tensor)
        r.add_post("/begin_weight_update", self.begin_weight_update)
        r.add_post("/end_weight_update", self.end_weight_update)
        r.add_post("/init_weights_update_group", self.nccl_unsupported)
        r.add_post("/update_weights_from_distributed", self.nccl_unsupported)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self.scheduler = Scheduler(self.runner, max_batch_size=self.args.max_batch_size,
                                   max_context_len=self.args.max_context_len, speculative=self.speculative)
        self.sched.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        if self.scheduler is not None:
            self.scheduler.abort(all_requests=True)
            await self.scheduler.stop()

    async def _body(self, request: web.Request) -> Any:
        """The parsed JSON body (None when empty); 413 past --max-request-bytes, 400 when not JSON."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"request body exceeds the server's --max-request-bytes "
                               f"{self.args.max_request_bytes}") from None
        if len(raw) > PARSE_IN_THREAD_BYTES:  # a weight bucket: keep the event loop (health, abort) free
            return await asyncio.to_thread(check.parse_json, raw)
        return check.parse_json(raw)

    async def _object(self, request: web.Request) -> dict[str, Any]:
        return check.body_object(await self._body(request))

    # ---- generation
    async def generate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body is None:
            raise check.BodyError("request body: expected a JSON object, got an empty body")
        parsed, sampling = check.generate_request(body, vocab_size=self.vocab_size,
                                                  max_context_len=self.args.max_context_len)
        req = self._request(parsed, build_sampling(sampling, self.eos_ids))
        future = self.sched.submit(req, parsed.session_params, list(parsed.input_ids))
        try:
            done: Request = await future
        except EngineDead:
            raise
        except Exception as e:  # noqa: BLE001 - the forward failed for this request only; like SGLang's 500
            return _error(f"generation failed: {type(e).__name__}: {e}", status=500)
        return web.json_response(self._response(done))

    def _request(self, parsed: GenerateRequest, sampling: Sampling) -> Request:
        # Like SGLang, return_routed_experts without --enable-return-routed-experts leaves the field absent.
        return Request(rid=parsed.rid or uuid.uuid4().hex, tokens=list(parsed.input_ids),
                       prompt_len=len(parsed.input_ids), sampling=sampling, return_logprob=parsed.return_logprob,
                       logprob_start_len=parsed.logprob_start_len, return_routed_experts=parsed.return_routed_experts,
                       routed_experts_start_len=parsed.routed_experts_start_len,
                       session_id=parsed.session_params.id if parsed.session_params else None,
                       top_logprobs_num=parsed.top_logprobs_num if parsed.return_logprob else 0)

    def _response(self, req: Request) -> dict[str, Any]:
        text_ids = list(req.output_ids)
        finish = req.finish or {"type": "abort"}
        if finish["type"] == "stop" and not req.sampling.no_stop_trim and text_ids:
            text_ids = text_ids[:-1]
        meta: dict[str, Any] = {
            "id": req.rid, "finish_reason": finish, "prompt_tokens": req.prompt_len,
            "completion_tokens": len(req.output_ids), "cached_tokens": req.cached_tokens,
            "weight_version": self.weight_version, **speculative.spec_meta(req),
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = logprob_entries(req.output_logprobs, req.output_ids)
            if req.logprob_start_len >= 0:
                # as SGLang: the entry at logprob_start_len is None (no logprob from inside the request)
                lps = req.input_logprobs or [None] * req.prompt_len
                k = req.logprob_start_len
                first = [None] if k < req.prompt_len else []
                meta["input_token_logprobs"] = logprob_entries(first + lps[k + 1:req.prompt_len],
                                                               req.tokens[k:req.prompt_len])
                if req.top_logprobs_num > 0:
                    tops = req.input_top_logprobs or [None] * req.prompt_len
                    meta["input_top_logprobs"] = top_logprob_entries(first + tops[k + 1:req.prompt_len])
            if req.top_logprobs_num > 0:
                meta["output_top_logprobs"] = top_logprob_entries(req.output_top_logprobs)
        if req.return_routed_experts and self.runner.capture_routing:
            rows = (np.concatenate(req.routing) if req.routing
                    else np.zeros((0, self.runner.num_layers, self.runner.top_k), np.int32))
            total = req.prompt_len + len(req.output_ids) - 1
            rows = rows[req.routed_experts_start_len:total]
            meta["routed_experts"] = encode_routed_experts(rows)
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(text_ids, skip_special_tokens=req.sampling.skip_special_tokens,
                                         spaces_between_special_tokens=req.sampling.spaces_between_special_tokens)
        return {"text": text, "output_ids": req.output_ids, "meta_info": meta}

    async def health(self, _request: web.Request) -> web.Response:
        if not self.sched.alive:
            return _error(f"unhealthy: the scheduler loop has stopped ({self.sched.failure})", status=503)
        return web.Response(text="")

    async def health_generate(self, _request: web.Request) -> web.Response:
        if not self.sched.alive:
            return _error(f"unhealthy: the scheduler loop has stopped ({self.sched.failure})", status=503)
        req = Request(rid=f"health-{uuid.uuid4().hex}", tokens=[0], prompt_len=1,
                      sampling=parse_sampling({"max_new_tokens": 1, "temperature": 0}, set(), self.vocab_size, 1),
                      return_logprob=False, logprob_start_len=-1, return_routed_experts=False,
                      routed_experts_start_len=0, session_id=None)
        try:
            done = await asyncio.wait_for(self.sched.submit(req, None, [0]), timeout=60)
        except Exception as e:  # noqa: BLE001
            return _error(f"health generation failed: {type(e).__name__}: {e}", status=503)
        if done.finish and done.finish["type"] == "abort":
            return _error("health generation was aborted", status=503)
        return web.Response(text="")

    async def model_info(self, _request: web.Request) -> web.Response:
        cfg = self.runner.model.config
        return web.json_response({
            "model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
            "weight_version": self.weight_version, "num_hidden_layers": self.runner.num_layers,
            "num_experts_per_tok": self.runner.top_k, "vocab_size": int(cfg.vocab_size),
            "max_context_len": self.args.max_context_len,
            "routed_experts_enabled": self.runner.capture_routing,
            "num_forward_steps": self.runner.forward_steps,
            "max_running_batch": self.sched.batched_requests_max,
            "mtp_layers": len(self.runner.mtp) if self.runner.mtp is not None else 0,
            "speculative_num_steps": self.sched.speculative.k if self.sched.speculative is not None else 0,
        })

    async def metrics(self, _request: web.Request) -> web.Response:
        lines = [f"hf_server_num_forward_steps {self.runner.forward_steps}",
                 f"hf_server_num_running_reqs {len(self.sched.running)}",
                 f"hf_server_num_queue_reqs {len(self.sched.pending)}",
                 f"hf_server_max_running_batch {self.sched.batched_requests_max}"]
        return web.Response(text="\n".join(lines) + "\n")

    # ---- control
    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        rid = check.string(body.get("rid"), "rid", default=None, max_len=check.MAX_ID_LEN)
        n = self.sched.abort(rid=rid, all_requests=check.boolean(body.get("abort_all"), "abort_all", False))
        return web.json_response({"success": True, "num_aborted": n})

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "in_place", "retract") or not isinstance(mode, str):
            raise check.FieldError("mode", '"abort", "in_place" or "retract"', mode)
        self.sched.pause()
        if mode == "abort":  # as SGLang: answer once every request has come back aborted
            self.sched.abort(all_requests=True)
            while self.sched.running and self.sched.alive:
                await asyncio.sleep(0.005)
        return web.json_response({"success": True, "message": f"generation paused ({mode})"})

    async def continue_generation(self, _request: web.Request) -> web.Response:
        self.sched.resume()
        return web.json_response({"success": True, "message": "generation continued"})

    async def flush_cache(self, _request: web.Request) -> web.Response:
        if self.sched.busy:
            return _error("cannot flush the cache while requests are running or pending; retry later")
        self.sched.drop_kv()
        return web.json_response({"success": True, "message": "cache flushed"})

    async def open_session(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        capacity = check.integer(body.get("capacity_of_str_len"), "capacity_of_str_len", 0, None, default=0)
        sid = check.string(body.get("session_id"), "session_id", default=None, non_empty=True,
                           max_len=check.MAX_ID_LEN)
        return web.json_response(self.sched.open_session(capacity, sid))

    async def close_session(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        sid = check.string(body.get("session_id"), "session_id", max_len=check.MAX_ID_LEN)
        self.sched.close_session(sid)
        return web.json_response({"success": True})

    # ---- weights
    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        version = check.weight_version(body.get("weight_version"))
        check.boolean(body.get("flush_cache"), "flush_cache", True)
        path = body.get("model_path")
        # Read and parse every file off the model thread; only the checked copy runs between steps.
        named = await asyncio.to_thread(check.read_checkpoint, path)
        n = await self._load(named, require_all=True, field="model_path")
        self.model_path = path
        return self._weights_updated(version, f"loaded {n} tensors from {path}")

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        version = check.weight_version(body.get("weight_version"))
        check.boolean(body.get("flush_cache"), "flush_cache", True)
        # Single process = TP 1: every rank's entry carries the same tensors; rank 0 is loaded.
        named = await asyncio.to_thread(check.serialized_tensors, body)
        if self.update_session is None:  # as SGLang 0.5.23's scheduler (weight_updater.py) refuses it
            return _error("update_weights_from_tensor must run between begin_weight_update() and end_weight_update()")
        n = await self._load(named, require_all=False, field="serialized_named_tensors[0]")
        return self._weights_updated(version, f"updated {n} tensors")

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        """SGLang's weight-update session: tensor updates are refused outside one (disk updates are not)."""
        body = await self._object(request)
        selector = body.get("selector", "all")
        if selector not in ("target", "draft", "all"):
            raise RequestError(f"field `selector`: expected one of target, draft, all, got {selector!r}")
        if self.update_session is not None:
            return _error("a weight-update session is already open; call end_weight_update() first")
        self.update_session = selector  # the MTP layers live in the one model here: every selector updates all
        return web.json_response({"success": True, "message": "Success"})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await self._object(request)
        if self.update_session is None:
            return _error("no weight-update session is open; call begin_weight_update() first")
        self.update_session = None
        return web.json_response({"success": True, "message": "Success"})

    async def _load(self, named: dict[str, torch.Tensor], *, require_all: bool, field: str) -> int:
        """Check and copy on the model thread (between two steps); a refusal leaves every weight as it was."""
        try:
            return await self.sched.run_on_model(lambda: self.runner.load_named_tensors(named, require_all=require_all))
        except ValueError as e:
            raise RequestError(f"field `{field}`: {e}") from None

    def _weights_updated(self, version: str | None, message: str) -> web.Response:
        if version is not None:
            self.weight_version = version
        self.sched.drop_kv()  # cached KV was computed with the old weights
        return web.json_response({"success": True, "message": message})

    async def nccl_unsupported(self, _request: web.Request) -> web.Response:
        return _error(NCCL_MESSAGE)


def _load_tokenizer(path: str) -> Any:
    """The tokenizer is only used to decode `text`; a checkpoint without one still serves ids."""
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001
        return None


def _eos_ids(model: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is None:
            continue
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    return ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--enable-return-routed-experts", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-context-len", type=int, default=512)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--weight-version", default="default")
    speculative.add_args(p)
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body accepted (HTTP 413 beyond); weight updates by tensor count")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_request_bytes <= 0:
        raise SystemExit("--max-request-bytes must be > 0")
    speculative.num_steps(args)  # bad speculative flags fail before the model loads
    torch.set_num_threads(args.num_threads)
    server = HFServer(args)
    # aiohttp's run_app turns SIGINT/SIGTERM into a clean shutdown (on_cleanup aborts requests).
    web.run_app(server.app(), host=args.host, port=args.port, print=None, handle_signals=True,
                shutdown_timeout=5)


if __name__ == "__main__":
    main()

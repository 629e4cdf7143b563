"""A local engine that speaks SGLang's native HTTP API, built on HF transformers (CPU or GPU).

    python -m rollout.local_server --model-path P --host 127.0.0.1 --port N \
        [--enable-return-routed-experts] [--max-batch-size B] [--max-context-len L] [--num-threads T]

It serves the subset of SGLang's API mopd uses (see rollout/sglang_api.py) so that tests and CPU
runs exercise the same client and manager code as production. A scheduler loop batches every
active request (prefill chunks and decode tokens alike) into one forward, up to max batch size.

Deviations from SGLang, on purpose:
- `/update_weights_from_tensor` takes `load_format: "safetensors"`: each entry of
  `serialized_named_tensors` is base64 of safetensors bytes with HF parameter names (SGLang's
  default MultiprocessingSerializer sends CUDA-IPC handles, which cannot cross HTTP on CPU).
  Only the first entry (TP rank 0) is used.
- `/init_weights_update_group` and `/update_weights_from_distributed` answer 400 (not served).
- Sessions are linear: `session_params.rid` must be the session's latest request (or absent, which
  starts the session over). A weight update or `/flush_cache` drops cached KV; the next turn
  re-prefills its whole context (reported through `cached_tokens`).
- Input logprobs are of the raw logits; output logprobs of softmax(logits / temperature) before
  top-p / top-k truncation (raw logits when temperature is 0), as SGLang reports them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import uuid
from typing import Any

import torch
from aiohttp import web

from rollout.local_engine import Engine
from rollout.local_model import LocalModel
from rollout.sglang_api import GenerateRequest, ProtocolError

ENGINE = web.AppKey("engine", Engine)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": {"message": message}, "success": False}, status=400)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise ProtocolError(f"request body: expected JSON ({e})") from None
    if not isinstance(body, dict):
        raise ProtocolError("request body: expected a JSON object")
    return body


@web.middleware
async def protocol_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except (ProtocolError, ValueError, TypeError) as e:
        return _bad(str(e))


async def generate(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _body(request)
    req = GenerateRequest.from_json(body)
    if req.stream:
        raise ProtocolError("stream: streaming is not served by the local server")
    if req.rid is None:
        req.rid = uuid.uuid4().hex
    act = engine.submit(req)
    return web.json_response(await act.done)


async def health_generate(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    act = engine.submit(GenerateRequest(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0}))
    await act.done
    return web.Response(text="")


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="")


async def model_info(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({"model_path": engine.model.model_path, "tokenizer_path": engine.model.model_path,
                              "is_generation": True, "weight_version": engine.weight_version,
                              "num_hidden_layers": engine.model.num_layers,
                              "num_experts_per_tok": engine.model.top_k,
                              "max_context_len": engine.max_context, "max_batch_size": engine.max_batch})


async def abort_request(request: web.Request) -> web.Response:
    body = await _body(request)
    rid = None if body.get("abort_all") else body.get("rid")
    if rid is None and not body.get("abort_all"):
        raise ProtocolError("abort_request: expected `rid` or `abort_all: true`")
    return web.json_response({"aborted": request.app[ENGINE].abort(rid)})


async def pause_generation(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    mode = (await _body(request)).get("mode", "abort")
    if mode not in ("abort", "retract", "in_place"):
        raise ProtocolError(f"mode: expected abort, retract or in_place, got {mode!r}")
    engine.paused = True
    if mode == "abort":
        engine.abort(None)
    return web.json_response({"success": True})


async def continue_generation(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.paused = False
    engine.wake.set()
    return web.json_response({"success": True})


async def flush_cache(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if engine.active:
        return web.Response(status=400, text=f"Cache not flushed: {len(engine.active)} request(s) pending")
    for seq, _ in engine.sessions.values():
        seq.drop_cache()
    return web.Response(text="Cache flushed.")


async def open_session(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _body(request)
    sid = str(body.get("session_id") or uuid.uuid4().hex)
    if sid in engine.sessions:
        raise ProtocolError(f"session_id: {sid!r} is already open")
    from rollout.local_model import SeqState

    engine.sessions[sid] = (SeqState(), None)
    return web.json_response(sid)


async def close_session(request: web.Request) -> web.Response:
    body = await _body(request)
    if "session_id" not in body:
        raise ProtocolError("session_id: required")
    request.app[ENGINE].sessions.pop(str(body["session_id"]), None)
    return web.Response(text="")


async def _swap(engine: Engine, body: dict[str, Any], load) -> web.Response:
    async with engine.lock:  # between forward steps
        try:
            await asyncio.to_thread(load)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            return web.json_response({"success": False, "message": str(e)}, status=400)
        for seq, _ in engine.sessions.values():
            seq.drop_cache()  # KV computed with the old weights
        if body.get("weight_version") is not None:
            engine.weight_version = str(body["weight_version"])
    return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                              "weight_version": engine.weight_version})


async def update_weights_from_disk(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _body(request)
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
        raise ProtocolError("model_path: expected the path of an HF checkpoint directory")
    if engine.active:  # requests in flight keep their KV: they finish on the new weights, as in SGLang
        pass
    return await _swap(engine, body, lambda: engine.model.reload(path))


async def update_weights_from_tensor(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _body(request)
    entries = body.get("serialized_named_tensors")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], str):
        raise ProtocolError("serialized_named_tensors: expected a list with one base64 string per TP rank")
    if body.get("load_format") != "safetensors":
        raise ProtocolError(f"load_format: this CPU server takes 'safetensors' (base64 safetensors bytes per "
                            f"entry), got {body.get('load_format')!r}; CUDA-IPC payloads cannot cross HTTP")
    tensors = engine.model.decode_safetensors_b64(entries[0])
    return await _swap(engine, body, lambda: engine.model.load_named_tensors(tensors))


async def not_served(request: web.Request) -> web.Response:
    return web.json_response({"success": False, "message": f"{request.path} is not served by the local server; "
                              "use update_weights_from_tensor or update_weights_from_disk"}, status=400)


def build_app(engine: Engine) -> web.Application:
    app = web.Application(middlewares=[protocol_errors], client_max_size=2 ** 31)
    app[ENGINE] = engine
    post = {"/generate": generate, "/abort_request": abort_request, "/pause_generation": pause_generation,
            "/continue_generation": continue_generation, "/flush_cache": flush_cache, "/open_session": open_session,
            "/close_session": close_session, "/update_weights_from_disk": update_weights_from_disk,
            "/update_weights_from_tensor": update_weights_from_tensor,
            "/init_weights_update_group": not_served, "/update_weights_from_distributed": not_served}
    for path, handler in post.items():
        app.router.add_post(path, handler)
    for path, handler in {"/health": health, "/health_generate": health_generate, "/model_info": model_info,
                          "/get_model_info": model_info}.items():
        app.router.add_get(path, handler)

    async def scheduler(app: web.Application):
        task = asyncio.create_task(app[ENGINE].run())
        yield
        task.cancel()

    app.cleanup_ctx.append(scheduler)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--enable-return-routed-experts", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-context-len", type=int, default=4096)
    p.add_argument("--num-threads", type=int, default=1, help="torch threads (CPU is shared by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.num_threads))
    torch.set_num_threads(args.num_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(LocalModel(args.model_path, args.device), max_batch=args.max_batch_size,
                    max_context=args.max_context_len, routed_experts=args.enable_return_routed_experts)
    web.run_app(build_app(engine), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

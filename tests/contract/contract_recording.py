"""The recording reverse proxy and helpers of the SGLang contract suite (fixtures are in conftest.py).

The proxy keeps what mopd's client really sent (method, path, JSON body) and what the server answered, so
the bodies can be checked against the real `sglang` package in its own venv (tests/contract/sglang_check.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
# MOPD_SGLANG_PYTHON points at another interpreter with sglang installed (default: the one setup_sglang.sh makes).
SGLANG_PYTHON = Path(os.environ.get("MOPD_SGLANG_PYTHON") or REPO / ".venv-sglang" / "bin" / "python")


def _rollout_conftest() -> Any:
    """tests/rollout/conftest.py by path (tests/ is not a package): its ServerProc starts the real server."""
    spec = importlib.util.spec_from_file_location("_rollout_conftest", REPO / "tests" / "rollout" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ServerProc = _rollout_conftest().ServerProc


@dataclass
class Record:
    mode: str
    method: str
    path: str
    body: Any
    status: int = 0
    response: Any = None


@dataclass
class RecordingProxy:
    """An aiohttp reverse proxy on 127.0.0.1 in its own thread (blocking urllib callers must not stall it)."""

    target: str
    model_path: Path | None = None  # the served checkpoint (its config gives the routed-experts shape)
    mode: str = "unset"
    records: list[Record] = field(default_factory=list)
    url: str = ""

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("recording proxy did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve(ready))
        self._loop.run_forever()

    async def _serve(self, ready: threading.Event) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        app = web.Application(client_max_size=2**30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        ready.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = {"__not_json__": raw[:200].decode(errors="replace")}
        record = Record(self.mode, request.method, request.path, body)
        self.records.append(record)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type",)}
        async with self._http.request(request.method, self.target + request.path_qs, data=raw or None,
                                      headers=headers) as resp:
            payload = await resp.read()
            record.status = resp.status
            if resp.content_type == "application/json":
                try:
                    record.response = json.loads(payload)
                except ValueError:
                    record.response = None
            return web.Response(body=payload, status=resp.status, content_type=resp.content_type)

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._http.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def require_sglang_venv() -> Path:
    """Skip on a developer machine without the contract venv; in CI (env CI set) its absence is a failure."""
    if SGLANG_PYTHON.exists():
        return SGLANG_PYTHON
    reason = f"{SGLANG_PYTHON} is missing: run ./setup_sglang.sh to create it (real sglang package)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)

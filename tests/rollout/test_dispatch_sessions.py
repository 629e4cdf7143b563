"""Dispatcher sessions on real loopback HTTP servers: a lost engine is SessionLost (resend in full), a bad
request is the caller's error and is neither retried nor treated as a lost engine."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from rollout.dispatch import Dispatcher, SessionLost
from rollout.engine_client import EngineError
from rollout.sglang_api import GenerateRequest
from tests.rollout.conftest import free_port

ANSWER = {"text": "", "output_ids": [5], "meta_info": {"finish_reason": {"type": "length"},
                                                       "output_token_logprobs": [[-0.5, 5, None]]}}


class SessionEngine:
    """/open_session, /generate (answers `status`), /close_session; records each /generate body."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.port = status, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bodies: list[dict] = []
        self.runner: web.AppRunner | None = None

    async def start(self) -> SessionEngine:
        async def open_session(_):
            return web.json_response("sid-1")

        async def generate(request):
            self.bodies.append(await request.json())
            body = ANSWER if self.status == 200 else {"error": {"message": "input_ids: too long"}}
            return web.Response(status=self.status, text=json.dumps(body), content_type="application/json")

        async def close_session(_):
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/open_session", open_session)
        app.router.add_post("/generate", generate)
        app.router.add_post("/close_session", close_session)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


def _request() -> GenerateRequest:
    return GenerateRequest(input_ids=[1, 2], sampling_params={"max_new_tokens": 1}, return_logprob=True)


def test_a_session_continues_after_its_last_request_and_a_dead_engine_is_session_lost():
    async def go():
        live = await SessionEngine().start()
        dead = f"http://127.0.0.1:{free_port()}"
        d = Dispatcher([live.url, dead], max_retries=1, retry_window_s=5, backoff_s=0.01, max_backoff_s=0.05)
        try:
            session = await d.open_session("traj")
            await d.generate_in_session(session, _request())
            await d.generate_in_session(session, _request())
            first, second = live.bodies
            assert first["session_params"] == {"id": "sid-1"}
            assert second["session_params"] == {"id": "sid-1", "rid": first["rid"]}  # continues turn 1
            await d.close_session(session)

            d.sticky["other"] = 1  # a trajectory whose session engine is gone
            with pytest.raises(SessionLost, match="cannot connect"):
                await d.open_session("other")
            assert d.failed[1] and "other" not in d.sticky and d.failovers == 1
            response = await d.generate(_request(), key="other")  # the full resend goes to the live engine
            assert response.output_ids == [5] and d.sticky["other"] == 0
        finally:
            await d.close()
            await live.stop()

    asyncio.run(go())


def test_a_bad_session_request_is_the_callers_error_not_a_lost_engine():
    async def go():
        engine = await SessionEngine(status=400).start()
        d = Dispatcher([engine.url], max_retries=3, retry_window_s=5)
        try:
            session = await d.open_session("traj")
            with pytest.raises(EngineError, match="HTTP 400") as info:
                await d.generate_in_session(session, _request())
            assert not isinstance(info.value, SessionLost)
            assert len(engine.bodies) == 1 and d.failovers == 0 and not d.failed[0]
        finally:
            await d.close()
            await engine.stop()

    asyncio.run(go())

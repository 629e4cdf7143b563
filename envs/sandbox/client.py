"""HTTP client for the in-sandbox agent (aiohttp), used by both sandbox backends."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp


class SandboxError(RuntimeError):
    """The agent refused a request or could not be reached; ``status`` is the HTTP status or 0."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AgentClient:
    """Talks to one agent. One aiohttp session per event loop (Ray actors and tests own their loops)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = aiohttp.ClientSession(headers=self._headers)
            self._loop = loop
        return self._session

    async def call(
        self,
        route: str,
        body: dict[str, Any] | bytes,
        timeout: float = 60.0,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        session = self._get_session()
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        try:
            async with session.post(
                f"{self.base_url}{route}",
                params=params,
                timeout=aiohttp.ClientTimeout(total=timeout),
                **kwargs,
            ) as resp:
                payload = await resp.json(content_type=None)
                if resp.status != 200:
                    raise SandboxError(
                        f"agent {route}: HTTP {resp.status}: {payload.get('error')}", resp.status
                    )
                return payload
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise SandboxError(
                f"agent {route} at {self.base_url} unreachable: {type(exc).__name__}: {exc}"
            ) from exc

    async def healthy(self, timeout: float = 2.0) -> bool:
        try:
            async with self._get_session().get(
                f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
            return False

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /health until the agent answers (pods: after the kubelet reports Ready)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.02
        while not await self.healthy():
            if loop.time() > deadline:
                raise SandboxError(f"agent at {self.base_url} not ready after {timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def read(self, path: str) -> bytes:
        return base64.b64decode((await self.call("/read", {"path": path}))["content_b64"])

    async def write(self, path: str, data: bytes, mode: int | None = None) -> None:
        """``mode`` None: the agent keeps the replaced file's permission bits (0644 for a new file)."""
        body: dict[str, Any] = {"path": path, "content_b64": base64.b64encode(data).decode()}
        if mode is not None:
            body["mode"] = mode
        await self.call("/write", body)

    async def upload(self, tar_bytes: bytes, dest: str = ".") -> int:
        return int((await self.call("/upload", tar_bytes, timeout=300.0, params={"dest": dest}))["files"])

    async def shutdown(self) -> None:
        try:
            await self.call("/shutdown", {}, timeout=5.0)
        except SandboxError:
            pass

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            try:
                await self._session.close()
            except RuntimeError:  # session created on a loop that is gone
                pass
        self._session = None

"""A sandbox worker: hosts environment sessions of one kind and keeps a pool of warm sandboxes.

Wrapped as a Ray actor by the Toolbox. Sessions are env instances built by the kind's registered
factory (envs/registry.py) and keyed by id; a warm sandbox is an agent already started and
answering, so ``open`` skips the cold start.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from envs.base import Env
from envs.config import SandboxConfig
from envs.registry import EnvOptions, env_kind, make_env
from envs.sandbox.base import Sandbox
from envs.sandbox.client import SandboxError
from envs.sandbox.local import LocalSandboxBackend
from envs.tool_parsing import ToolCall


def make_backend(config: SandboxConfig) -> Any:
    """The sandbox backend named by ``config.backend`` (kubernetes: in-cluster config, else kubeconfig)."""
    if config.backend == "kubernetes":
        from kubernetes import config as kube_config

        from envs.sandbox.kubernetes import KubernetesSandboxBackend

        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            kube_config.load_kube_config()
        return KubernetesSandboxBackend(config)
    return LocalSandboxBackend(config)


def as_action(payload: Any) -> Any:
    """The ToolManager's wire form (text, or {"name", "arguments"}) -> what ``Env.step`` takes.

    Anything else is passed on unchanged, and the env answers it with an error observation.
    """
    if isinstance(payload, dict) and "name" in payload:
        return ToolCall(payload["name"], payload.get("arguments", {}))
    return payload


class SandboxWorker:
    """Plain class (usable in-process); ``toolbox.toolbox`` makes it a Ray actor."""

    def __init__(
        self,
        kind: str,
        sandbox: dict[str, Any] | None = None,
        max_turns: int = 30,
        command_timeout: float = 60.0,
    ) -> None:
        self.env_kind = env_kind(kind)  # ValueError naming the registered kinds
        self.kind = kind
        self.config = SandboxConfig(**(sandbox or {}))
        self.backend = make_backend(self.config)
        self.options = EnvOptions(max_turns, command_timeout)
        self.sessions: dict[str, Env] = {}
        self.warm: asyncio.Queue[Sandbox] = asyncio.Queue()
        self.cold_starts = 0
        self.warm_hits = 0
        self.target_warm = 0
        self._refill: asyncio.Task | None = None

    def pid(self) -> int:
        return os.getpid()

    async def prewarm(self, n: int) -> int:
        """Top the warm pool up to ``n`` ready sandboxes and keep it there; returns the pool size."""
        self.target_warm = n
        missing = n - self.warm.qsize()
        if missing > 0:
            for sb in await asyncio.gather(*(self.backend.create() for _ in range(missing))):
                self.warm.put_nowait(sb)
        return self.warm.qsize()

    async def _sandbox(self) -> Sandbox:
        while not self.warm.empty():
            sb = self.warm.get_nowait()
            if await sb.alive():
                self.warm_hits += 1
                self._top_up()
                return sb
            await sb.close()
        self.cold_starts += 1
        return await self.backend.create()

    def _top_up(self) -> None:
        """Refill the warm pool in the background after a sandbox was taken from it."""
        if self._refill is None or self._refill.done():
            self._refill = asyncio.ensure_future(self.prewarm(self.target_warm))

    async def open(self, session_id: str, task: dict[str, Any]) -> str:
        await self.close(session_id)
        env = make_env(self.kind, self._sandbox, self.options)
        self.sessions[session_id] = env
        return await env.reset(self.env_kind.load_task(task))

    async def step(self, session_id: str, action: dict[str, Any] | str) -> dict[str, Any]:
        """One env step. A lost sandbox is reported as ``{"lost": True}`` so the caller can replay."""
        env = self.sessions.get(session_id)
        if env is None:
            return {
                "lost": True,
                "observation": f"unknown session {session_id}",
                "reward": 0.0,
                "done": False,
                "info": {},
            }
        try:
            result = await env.step(as_action(action))
        except SandboxError as exc:  # the env turned every model-caused failure into an observation
            sandbox = getattr(env, "sandbox", None)
            if exc.status == 0 or sandbox is None or not await sandbox.alive():
                return {"lost": True, "observation": str(exc), "reward": 0.0, "done": False, "info": {}}
            raise
        return {
            "observation": result.observation,
            "reward": result.reward,
            "done": result.done,
            "info": result.info,
        }

    async def kill_sandbox(self, session_id: str) -> int:
        """Test/ops hook: kill a session's agent process (simulates a crashed sandbox)."""
        sandbox = getattr(self.sessions[session_id], "sandbox", None)
        if sandbox is None:
            raise ValueError(f"session {session_id} has no sandbox to kill")
        pid = sandbox.info["agent_pid"]
        os.kill(pid, 9)
        return pid

    async def close(self, session_id: str) -> None:
        env = self.sessions.pop(session_id, None)
        if env is not None:
            await env.close()

    async def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "warm": self.warm.qsize(),
            "cold_starts": self.cold_starts,
            "warm_hits": self.warm_hits,
            "pid": os.getpid(),
        }

    async def shutdown(self) -> None:
        self.target_warm = 0
        if self._refill is not None:
            self._refill.cancel()
        for sid in list(self.sessions):
            await self.close(sid)
        while not self.warm.empty():
            await self.warm.get_nowait().close()

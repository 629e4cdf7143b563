"""A sandbox worker: hosts environment sessions of one kind and keeps a pool of warm sandboxes.

Wrapped as a Ray actor by the Toolbox. Sessions are env instances built by the kind's registered
factory (envs/registry.py) and keyed by id; a warm sandbox is an agent already started and
answering, so ``open`` skips the cold start.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
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


def task_snapshot(task: Any) -> str | None:
    """The directory a task's workspace starts from (``snapshot_dir`` of SWE tasks), resolved."""
    snapshot = getattr(task, "snapshot_dir", None)
    return os.path.realpath(snapshot) if isinstance(snapshot, str) and snapshot else None


class SandboxWorker:
    """Plain class (usable in-process); ``toolbox.toolbox`` makes it a Ray actor.

    Warm sandboxes are pooled by the snapshot they hold (``None``: an empty workspace). A session
    takes one holding its task's snapshot, else an empty one (its env uploads the files), never one
    holding another task's; a sandbox leaves the pool when taken and is never pooled again.
    """

    def __init__(
        self,
        kind: str,
        sandbox: dict[str, Any] | None = None,
        max_turns: int = 30,
        command_timeout: float = 60.0,
        max_preloaded: int = 64,
    ) -> None:
        self.env_kind = env_kind(kind)  # ValueError naming the registered kinds
        self.kind = kind
        self.config = SandboxConfig(**(sandbox or {}))
        self.backend = make_backend(self.config)
        self.options = EnvOptions(max_turns, command_timeout)
        self.sessions: dict[str, Env] = {}
        # snapshot -> ready sandboxes; a snapshot's key moves to the end when prewarmed again
        self.warm: dict[str | None, deque[Sandbox]] = {None: deque()}
        self.max_preloaded = max_preloaded  # snapshot-holding sandboxes kept at most (oldest go)
        self.cold_starts = 0
        self.warm_hits = 0
        self.target_warm = 0
        self._refill: asyncio.Task | None = None

    def pid(self) -> int:
        return os.getpid()

    def _snapshot(self, task: Any) -> str | None:
        """The snapshot a sandbox for ``task`` can be created with (only the local backend preloads)."""
        return task_snapshot(task) if isinstance(self.backend, LocalSandboxBackend) else None

    async def _create(self, snapshot: str | None) -> Sandbox:
        return await (self.backend.create(snapshot=snapshot) if snapshot else self.backend.create())

    async def _create_warm(self, snapshot: str | None) -> Sandbox:
        """A sandbox for the warm pool, health-checked now: the check also opens the keep-alive
        connection that the check at checkout and the session's first call reuse (a new one costs
        ~2 ms: the client session, the TCP handshake and the agent's handler thread)."""
        sb = await self._create(snapshot)
        if not await sb.alive():
            await sb.close()
            raise SandboxError(f"warm sandbox {sb.id} does not answer its health check")
        return sb

    async def prewarm(self, n: int, task: dict[str, Any] | None = None) -> int:
        """Top the warm pool up to ``n`` ready sandboxes and keep it there; returns the pool size.

        With ``task`` (its JSON form): ``n`` sandboxes that already hold the task's snapshot, for
        episodes about to start on it (made once, not refilled), so their first observation skips
        the upload; a task without one (or a backend that cannot preload) gets empty sandboxes.
        """
        if task is None:
            self.target_warm = n
            key = None
        else:
            key = self._snapshot(self.env_kind.load_task(task))
        self.warm[key] = self.warm.pop(key, deque())
        missing = n - len(self.warm[key])
        made = await asyncio.gather(*(self._create_warm(key) for _ in range(missing)), return_exceptions=True)
        # the pool is looked up again: it may have been evicted (and dropped) during the await
        self.warm.setdefault(key, deque()).extend(sb for sb in made if isinstance(sb, Sandbox))
        await self._evict()
        failed = [e for e in made if isinstance(e, BaseException)]
        if failed:
            raise failed[0]
        return len(self.warm.get(key, ()))

    async def _evict(self) -> None:
        """Close the least recently prewarmed snapshot-holding sandboxes beyond ``max_preloaded``."""
        excess = sum(len(p) for k, p in self.warm.items() if k is not None) - self.max_preloaded
        for key in [k for k in self.warm if k is not None]:
            pool = self.warm.get(key)  # a concurrent eviction may have dropped it meanwhile
            while pool and excess > 0:
                excess -= 1
                await pool.popleft().close()
            if pool is not None and not pool and self.warm.get(key) is pool:
                del self.warm[key]

    async def _sandbox(self, snapshot: str | None) -> Sandbox:
        """A ready sandbox for a task with ``snapshot``: one holding it, else an empty one, else new."""
        for key in dict.fromkeys((snapshot, None)):
            pool = self.warm.get(key)
            while pool:
                sb = pool.popleft()  # out of the pool before the await: nobody else gets it
                if await sb.alive():
                    self.warm_hits += 1
                    if key is None:
                        self._top_up()
                    return sb
                await sb.close()
        self.cold_starts += 1
        return await self._create(snapshot)

    def _top_up(self) -> None:
        """Refill the warm pool in the background after a sandbox was taken from it."""
        if self._refill is None or self._refill.done():
            self._refill = asyncio.ensure_future(self.prewarm(self.target_warm))

    async def open(self, session_id: str, task: dict[str, Any]) -> str:
        await self.close(session_id)
        loaded = self.env_kind.load_task(task)
        snapshot = self._snapshot(loaded)
        env = make_env(self.kind, lambda: self._sandbox(snapshot), self.options)
        self.sessions[session_id] = env
        return await env.reset(loaded)

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
            "warm": sum(len(p) for p in self.warm.values()),
            "warm_preloaded": sum(len(p) for k, p in self.warm.items() if k is not None),
            "cold_starts": self.cold_starts,
            "warm_hits": self.warm_hits,
            "pid": os.getpid(),
        }

    async def shutdown(self) -> None:
        """Close every session and warm sandbox; on a backend that can, delete whatever of this
        worker's run is left (a pod whose create was cancelled mid-request still carries its label)."""
        self.target_warm = 0
        if self._refill is not None and not self._refill.done():
            self._refill.cancel()
            await asyncio.gather(self._refill, return_exceptions=True)  # its create cleans up first
        for sid in list(self.sessions):
            await self.close(sid)
        for pool in self.warm.values():
            while pool:
                await pool.popleft().close()
        sweep = getattr(self.backend, "sweep", None)  # the Kubernetes backend's, by run label
        if sweep is not None:
            await sweep()

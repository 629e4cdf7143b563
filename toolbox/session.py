"""Episodes as the agent loop drives them (``envs.base.EnvSession``), on the ToolManager -> Toolbox
(Ray actor pools) -> sandbox path.

One ``ToolboxSessions`` per job wraps the ToolManager: ``prewarm`` readies sandboxes for a step's
episodes before generation starts, ``open`` starts one episode, and ``metrics`` gives the step's
tool counters and latency percentiles (then starts counting afresh). Everything the model writes,
and every fault of a tool or sandbox, comes back from ``step`` as an observation: a malformed call
or a timeout carries ``info["error"]``; a lost sandbox is rebuilt and the session's earlier calls
replayed by the Toolbox, so the episode continues.
"""

from __future__ import annotations

import time
from typing import Any

from envs.base import StepResult
from envs.registry import env_kind
from toolbox.manager import ToolManager, percentile


class ToolboxSession:
    """One episode on one task (``envs.base.EnvSession``); made by ``ToolboxSessions.open``."""

    def __init__(
        self, owner: ToolboxSessions, kind: str, task: dict[str, Any], session_id: str, first: str
    ) -> None:
        self._owner = owner
        self.kind = kind
        self.task = task  # the task's JSON form, as the Toolbox replays it
        self.session_id: str | None = session_id
        self._first: str | None = first

    async def reset(self) -> str:
        """The first observation; called again, a fresh episode on the same task."""
        if self._first is not None:
            first, self._first = self._first, None
            return first
        await self.close()
        self.session_id, first = await self._owner.manager.start(self.kind, self.task)
        return first

    async def step(self, model_text: str) -> StepResult:
        """The model's whole turn in, the env's answer out (``info["latency_s"]``: this call's wall time)."""
        if self.session_id is None:
            raise RuntimeError("ToolboxSession.step() after close(); call reset() first")
        self._first = None
        t0 = time.perf_counter()
        result = await self._owner.manager.step(self.session_id, model_text)
        latency = time.perf_counter() - t0
        info = dict(result.info, latency_s=latency)
        self._owner.record(latency, error="error" in info)
        return result._replace(info=info)

    async def close(self) -> None:
        if self.session_id is not None:
            sid, self.session_id = self.session_id, None
            await self._owner.manager.close(sid)


class ToolboxSessions:
    """The job's door to multi-turn environments: opens ``EnvSession``s and counts their tool calls."""

    def __init__(self, manager: ToolManager) -> None:
        self.manager = manager
        self._latencies: list[float] = []
        self._errors = 0

    async def prewarm(self, kind: str, n: int, task: Any = None) -> int:
        """Ready sandboxes for ``n`` episodes of ``kind`` about to start; returns how many are warm.

        With ``task`` (the episodes' task object or JSON form) the sandboxes already hold its files,
        so those episodes' first observation skips the upload; a bad task raises ValueError here.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"prewarm: n must be an integer >= 0, got {n!r}")
        if task is not None:
            spec = env_kind(kind)
            task = task if isinstance(task, dict) else spec.dump_task(task)
            spec.load_task(task)
        return (await self.manager.prewarm_for(kind, n, task)).get(kind, 0)

    async def open(self, kind: str, task: Any) -> ToolboxSession:
        """Start an episode of ``kind`` on ``task`` (its task object or JSON form).

        The task is checked here, so a bad one raises ValueError in the caller, not in a worker.
        """
        spec = env_kind(kind)
        payload = task if isinstance(task, dict) else spec.dump_task(task)
        spec.load_task(payload)
        sid, first = await self.manager.start(kind, payload)
        return ToolboxSession(self, kind, payload, sid, first)

    def record(self, latency_s: float, error: bool) -> None:
        self._latencies.append(latency_s)
        self._errors += int(error)

    def metrics(self) -> dict[str, float]:
        """This step's tool calls, errors and latency p50/p99 (seconds); counting restarts from zero."""
        out = {
            "agent/tool_calls": float(len(self._latencies)),
            "agent/tool_errors": float(self._errors),
            "agent/tool_latency_p50_s": percentile(self._latencies, 50),
            "agent/tool_latency_p99_s": percentile(self._latencies, 99),
        }
        self._latencies, self._errors = [], 0
        return out

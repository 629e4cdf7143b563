"""The per-rollout-worker ToolManager: the agent loop's only door to tools.

Pre-warms the sandboxes its trajectories will need, runs every tool call with a timeout, turns
failures into observations the model can read, recovers sessions whose sandbox timed out or died,
computes rewards as background tasks, and keeps latency (p50/p99) and failure counts per tool.
Tasks travel to the Toolbox in their kind's JSON form (``EnvKind.dump_task``, envs/registry.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from typing import Any

import ray

from envs.base import StepResult
from envs.registry import env_kind
from envs.tool_parsing import ToolCall
from toolbox.toolbox import get_or_create_toolbox


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1)))]


def tool_label(action: Any, tools: dict[str, dict[str, Any]]) -> str:
    """The metrics key of an action: a name in ``tools``, else "text" / "invalid" (bounded keys)."""
    if isinstance(action, str):
        return "text"
    name = getattr(action, "name", None)
    return name if isinstance(name, str) and name in tools else "invalid"


def _positive_seconds(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


class ToolManager:
    def __init__(self, toolbox: Any = None, call_timeout_s: float = 120.0) -> None:
        call_timeout_s = _positive_seconds("call_timeout_s", call_timeout_s)
        self.toolbox = toolbox if toolbox is not None else get_or_create_toolbox()
        self.call_timeout_s = call_timeout_s
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, int] = defaultdict(int)
        self.timeouts: dict[str, int] = defaultdict(int)
        self._tools: dict[str, dict[str, dict[str, Any]]] = {}  # session id -> its kind's tool schemas

    async def prewarm(self, kind: str, per_worker: int, task: Any = None) -> dict[str, int]:
        """Keep ``per_worker`` ready sandboxes on every worker of ``kind``; with ``task`` (its task
        object or JSON form), ``per_worker`` sandboxes that already hold its snapshot, made once."""
        payload = task if task is None or isinstance(task, dict) else env_kind(kind).dump_task(task)
        return await self.toolbox.prewarm.remote(kind, per_worker, payload)

    async def prewarm_for(self, kind: str, trajectories: int, task: Any = None) -> dict[str, int]:
        """Pre-warm enough sandboxes for ``trajectories`` sessions about to start (spread over
        workers), on ``task`` when given."""
        workers = (await self.toolbox.stats.remote())["pools"][kind]["workers"]
        return await self.prewarm(kind, -(-trajectories // max(1, workers)), task)

    async def start(self, kind: str, task: Any) -> tuple[str, str]:
        """Open a session on a task of ``kind`` (its task object or JSON form); returns (session id,
        first observation)."""
        spec = env_kind(kind)
        payload = task if isinstance(task, dict) else spec.dump_task(task)
        sid, observation = await self.toolbox.open_session.remote(kind, payload)
        self._tools[sid] = spec.tools
        return sid, observation

    async def step(self, session_id: str, action: ToolCall | str, timeout: float | None = None) -> StepResult:
        """Run one tool call. Timeouts and failures come back as observations, never as exceptions.

        A malformed call is answered by the environment with an error observation (``info["error"]``
        names the kind); ``"infrastructure"`` and ``"timeout"`` are reserved for failures the model
        did not cause.
        """
        limit = self.call_timeout_s if timeout is None else _positive_seconds("timeout", timeout)
        tool = tool_label(action, self._tools.get(session_id, {}))
        if isinstance(action, str):
            payload: Any = action
        elif isinstance(action, ToolCall):
            payload = {"name": action.name, "arguments": action.arguments}
        else:  # the env explains what a tool call must look like
            payload = {"invalid": type(action).__name__}
        t0 = time.perf_counter()
        ref = self.toolbox.step.remote(session_id, payload)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(ref.future()), limit)
        except TimeoutError:
            self.timeouts[tool] += 1
            self.failures[tool] += 1
            ray.cancel(ref)  # the Toolbox coroutine stops; recover() below replaces the sandbox
            try:
                await self.toolbox.recover.remote(session_id)  # fresh sandbox with the session's history
            except Exception as exc:  # noqa: BLE001 - still an observation, never an exception
                return StepResult(
                    f"Tool `{tool}` timed out after {limit:g}s and the workspace could not be restored.",
                    0.0,
                    False,
                    {"error": "infrastructure", "tool": tool, "detail": f"recover: {exc!s:.500}"},
                )
            return StepResult(
                f"Tool `{tool}` timed out after {limit:g}s; the "
                "workspace was restored to its state before this call.",
                0.0,
                False,
                {"error": "timeout", "tool": tool},
            )
        except Exception as exc:  # noqa: BLE001 - any infrastructure failure is an observation
            self.failures[tool] += 1
            return StepResult(
                f"Tool `{tool}` failed: {type(exc).__name__}",
                0.0,
                False,
                {"error": "infrastructure", "tool": tool, "detail": str(exc)[:500]},
            )
        self.latency[tool].append(time.perf_counter() - t0)
        return StepResult(
            result["observation"], float(result["reward"]), bool(result["done"]), result["info"]
        )

    def reward_async(self, session_id: str) -> asyncio.Task:
        """Submit (``finish``) in the background; await the task for the reward."""

        async def run() -> float:
            try:
                result = await self.step(
                    session_id, ToolCall("finish", {}), timeout=max(self.call_timeout_s, 600)
                )
                return result.reward
            finally:
                await self.close(session_id)

        return asyncio.ensure_future(run())

    async def close(self, session_id: str) -> None:
        self._tools.pop(session_id, None)
        await self.toolbox.close_session.remote(session_id)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tool, values in self.latency.items():
            out[f"tools/{tool}/p50_s"] = percentile(values, 50)
            out[f"tools/{tool}/p99_s"] = percentile(values, 99)
            out[f"tools/{tool}/calls"] = float(len(values))
        for tool, n in self.failures.items():
            out[f"tools/{tool}/failures"] = float(n)
        for tool, n in self.timeouts.items():
            out[f"tools/{tool}/timeouts"] = float(n)
        return out

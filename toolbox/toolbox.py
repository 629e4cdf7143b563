"""The cluster-wide Toolbox: a named Ray actor that owns pools of sandbox-worker actors per env kind.

It admits each tool call through a per-tool quota and QPS bucket, routes sessions to workers,
keeps ``warm_per_worker`` sandboxes ready on every worker, and, when a worker actor dies or a
sandbox is lost, starts a replacement, replays the session's successful actions there and retries
the call, so a rollout sees a slower step instead of a failed trajectory.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from envs.registry import env_kind
from envs.tool_parsing import parse_tool_calls
from toolbox.ratelimit import Admission
from toolbox.worker import SandboxWorker

TOOLBOX_NAME = "mopd-toolbox"
NAMESPACE = "mopd"


def admission_key(action: Any, tools: dict[str, dict[str, Any]]) -> str:
    """The tool a call will run, for its quota and QPS bucket: model text is parsed here, so a
    ``bash`` call written as text counts against the ``bash`` quota like a parsed one. Calls that
    will fail to parse share the "text" bucket; names not in ``tools`` share "invalid" (bounded keys)."""
    if isinstance(action, str):
        parsed = parse_tool_calls(action, "auto", tools)
        return parsed.calls[0].name if parsed.ok and len(parsed.calls) == 1 else "text"
    name = action.get("name") if isinstance(action, dict) else None
    return name if isinstance(name, str) and name in tools else "invalid"


@dataclass
class PoolSpec:
    workers: int = 2
    warm_per_worker: int = 1
    sandbox: dict[str, Any] = field(default_factory=dict)  # SandboxConfig fields
    max_turns: int = 30
    command_timeout: float = 60.0

    def __post_init__(self) -> None:
        """Fail when the Toolbox is built, not at the first session: a NaN limit would switch it off."""
        for name, low in (("workers", 1), ("warm_per_worker", 0), ("max_turns", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"toolbox pool `{name}` must be an integer >= {low}, got {value!r}")
        t = self.command_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(
                f"toolbox pool `command_timeout` must be a finite number of seconds > 0, got {t!r}"
            )
        if not isinstance(self.sandbox, dict):
            raise ValueError(  # noqa: TRY004 - a config error, like the checks above
                f"toolbox pool `sandbox` must be a mapping of SandboxConfig fields, got {self.sandbox!r}"
            )


@dataclass
class _Session:
    kind: str
    task: dict[str, Any]
    worker: int
    history: list[Any] = field(default_factory=list)
    epoch: int = 0  # bumped on every restore; a call from an older epoch must not restore again


@ray.remote(num_cpus=0, max_concurrency=1000)
class _WorkerActor(SandboxWorker):
    pass


class ToolboxImpl:
    """Body of the Toolbox actor (async methods run concurrently on the actor's event loop)."""

    def __init__(
        self,
        pools: dict[str, dict[str, Any]],
        max_concurrent: dict[str, int] | None = None,
        qps: dict[str, float] | None = None,
        max_retries: int = 2,
    ) -> None:
        self.specs = {}
        self.tools = {}
        for kind, spec in pools.items():
            try:
                self.tools[kind] = env_kind(kind).tools
            except ValueError as exc:
                raise ValueError(f"toolbox.pools: {exc}") from None
            self.specs[kind] = PoolSpec(**spec)
        self.admission = Admission(max_concurrent, qps)
        self.max_retries = max_retries
        self.workers: dict[str, list[Any]] = {
            k: [self._new_worker(k) for _ in range(s.workers)] for k, s in self.specs.items()
        }
        self.sessions: dict[str, _Session] = {}
        self._ids = itertools.count()
        self.replaced = 0
        self.retried = 0
        self.replayed = 0

    def _new_worker(self, kind: str) -> Any:
        s = self.specs[kind]
        return _WorkerActor.remote(kind, s.sandbox, s.max_turns, s.command_timeout)

    async def prewarm(
        self, kind: str | None = None, per_worker: int | None = None, task: dict[str, Any] | None = None
    ) -> dict[str, int]:
        """Ready sandboxes on every worker of ``kind`` (all kinds); with ``task`` (one kind's task
        in JSON form) they hold its snapshot. Returns the warm sandboxes per kind."""
        if task is not None and kind is None:
            raise ValueError("prewarm: a task needs its env kind")
        kinds = [kind] if kind else list(self.workers)
        out = {}
        for k in kinds:
            n = per_worker if per_worker is not None else self.specs[k].warm_per_worker
            sizes = await asyncio.gather(
                *(w.prewarm.remote(n, task) for w in self.workers[k]), return_exceptions=True
            )
            out[k] = sum(s for s in sizes if isinstance(s, int))
        return out

    def _pick(self, kind: str) -> int:
        load = [0] * len(self.workers[kind])
        for s in self.sessions.values():
            if s.kind == kind:
                load[s.worker] += 1
        return min(range(len(load)), key=load.__getitem__)

    async def _replace(self, kind: str, index: int, dead: Any) -> None:
        if self.workers[kind][index] is dead:  # first caller to notice replaces it
            self.workers[kind][index] = self._new_worker(kind)
            self.replaced += 1
            asyncio.ensure_future(self.workers[kind][index].prewarm.remote(self.specs[kind].warm_per_worker))

    async def open_session(self, kind: str, task: dict[str, Any]) -> tuple[str, str]:
        if kind not in self.workers:
            raise ValueError(f"no toolbox pool for env kind {kind!r}; pools: {sorted(self.workers)}")
        sid = f"{kind}-{next(self._ids)}"
        self.sessions[sid] = _Session(kind, task, self._pick(kind))
        return sid, await self._restore(sid, replay=False)

    async def _restore(self, sid: str, replay: bool = True) -> str:
        """(Re)create the session on its worker; after a loss, replay the actions that succeeded."""
        s = self.sessions[sid]
        s.epoch += 1
        for _ in range(self.max_retries + 1):
            worker = self.workers[s.kind][s.worker]
            try:
                obs = await worker.open.remote(sid, s.task)
                if replay:
                    for action in s.history:
                        await worker.step.remote(sid, action)
                    self.replayed += 1
                return obs
            except RayActorError:
                await self._replace(s.kind, s.worker, worker)
        raise RuntimeError(f"session {sid}: could not restore after {self.max_retries + 1} attempts")

    async def step(self, sid: str, action: dict[str, Any] | str) -> dict[str, Any]:
        s = self.sessions.get(sid)
        if s is None:
            raise KeyError(f"unknown toolbox session {sid!r}")
        key = admission_key(action, self.tools[s.kind])
        return await self.admission(key, lambda: self._step(sid, s, action))

    async def _step(self, sid: str, s: _Session, action: dict[str, Any] | str) -> dict[str, Any]:
        for attempt in range(self.max_retries + 1):
            worker = self.workers[s.kind][s.worker]
            epoch = s.epoch
            try:
                result = await worker.step.remote(sid, action)
            except RayActorError:
                await self._replace(s.kind, s.worker, worker)
                result = {"lost": True}
            if not result.get("lost"):
                if not result["done"]:
                    s.history.append(action)
                result["info"]["attempts"] = attempt + 1
                return result
            if s.epoch != epoch or self.sessions.get(sid) is not s:
                # restored (or closed) by someone else meanwhile, e.g. the caller timed out and
                # recovered: this call is stale, its result must not touch the new workspace
                return {
                    "observation": "superseded",
                    "reward": 0.0,
                    "done": False,
                    "info": {"error": "superseded", "attempts": attempt + 1},
                }
            self.retried += 1
            await self._restore(sid)
        raise RuntimeError(f"session {sid}: tool call failed after {self.max_retries + 1} attempts")

    async def recover(self, sid: str) -> str:
        """Rebuild a session from scratch + replay (after a caller-side timeout)."""
        return await self._restore(sid)

    async def close_session(self, sid: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            try:
                await self.workers[s.kind][s.worker].close.remote(sid)
            except RayActorError:
                pass

    def worker(self, kind: str, index: int) -> Any:
        return self.workers[kind][index]

    def session_worker(self, sid: str) -> Any:
        s = self.sessions[sid]
        return self.workers[s.kind][s.worker]

    async def stats(self) -> dict[str, Any]:
        per_worker = {}
        for kind, ws in self.workers.items():
            res = await asyncio.gather(*(w.stats.remote() for w in ws), return_exceptions=True)
            per_worker[kind] = [r if isinstance(r, dict) else {"error": repr(r)} for r in res]
        return {
            "sessions": len(self.sessions),
            "replaced_workers": self.replaced,
            "retried_calls": self.retried,
            "replayed_sessions": self.replayed,
            "peak_in_flight": dict(self.admission.peak),
            "workers": per_worker,
            "pools": {k: asdict(v) for k, v in self.specs.items()},
        }

    async def shutdown(self) -> None:
        for ws in self.workers.values():
            await asyncio.gather(*(w.shutdown.remote() for w in ws), return_exceptions=True)
            for w in ws:
                ray.kill(w)


_ToolboxActor = ray.remote(num_cpus=0, max_concurrency=1000)(ToolboxImpl)


def get_or_create_toolbox(
    pools: dict[str, dict[str, Any]] | None = None,
    *,
    name: str = TOOLBOX_NAME,
    detached: bool = False,
    **kwargs: Any,
) -> Any:
    """The named Toolbox actor: attach if it exists in the cluster, else create it from ``pools``."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        if pools is None:
            raise ValueError(
                f"no Toolbox actor named {name!r} in namespace {NAMESPACE!r} and no pools given"
            ) from None
    opts: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "get_if_exists": True}
    if detached:
        opts["lifetime"] = "detached"
    return _ToolboxActor.options(**opts).remote(pools, **kwargs)

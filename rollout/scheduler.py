"""Rollout by sequence, not by batch: a fixed number of sequences in flight, the next one submitted as one ends.

`rollout.scheduler=sequence`. Each sequence (a single-turn sample or an agent episode) is its own coroutine
through `RolloutManager.run_sample`; the scheduler keeps `rollout.in_flight_per_engine * num_engines` of them
in flight, starting whole groups (the n samples of one prompt) from the data source, so an engine never idles
while a batch drains. A batch is complete when it holds `source.quota(k)` accepted groups of every source; the
groups still running then stay in flight for a later batch (their extra finished groups wait likewise).

Weight pushes: `pause` closes the gate every model turn waits at, then aborts the requests in flight until none
is left (what SGLang's /pause_generation mode abort does inside the engine; done here, where the gate also stops
new requests, so no request can slip into a paused engine and hang there). Aborted requests come back with what
they generated; `resume` opens the gate.
With `rollout.partial_rollout` a cut turn then continues from its prefix on the new weights (each token keeps
the version that sampled it, rollout/trajectory.py); without it the unfinished groups are thrown away and their
prompts queued again from scratch. Groups whose oldest token is more than `rollout.max_staleness` versions
behind are dropped or regenerated (`rollout.stale_policy`).

The scheduler runs its own asyncio loop in a background thread, so sequences live across steps; every public
method is synchronous. Sync mode (continuous=False) generates only inside `next_batch` and is paused when it
returns; continuous mode keeps generating between calls (the overlap loop), holding at most
`max_staleness` batches beyond the one being assembled so that no queued group goes stale.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from mopd.core.types import Sample
from rollout.config import RolloutConfig
from rollout.dispatch import Dispatcher, Gate
from rollout.rollout_manager import RolloutManager
from rollout.scheduler_state import (
    STATE_VERSION,
    Group,
    finished_group_from_state,
    finished_group_state,
    group_from_state,
    group_state,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class GroupSource(Protocol):
    """Where groups come from (mopd/data.py's DataScheduler): per-source quotas and one prompt's n samples."""

    def quota(self, num_groups: int) -> dict[str, int]: ...

    def next_group(self, source: str) -> list[Sample]: ...

    def source_of(self, sample: Sample) -> str: ...


GroupHook = Callable[[list[Sample]], Awaitable[bool]]  # False: the group is filtered out and replaced


@dataclass
class Batch:
    groups: list[list[Sample]]
    stats: dict[str, float]

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g]


class SequenceScheduler:
    """See the module docstring; `close` must be called (it cancels the sequences and stops the thread)."""

    def __init__(self, manager: RolloutManager, source: GroupSource, cfg: RolloutConfig, *,
                 group_hook: GroupHook | None = None, continuous: bool = False,
                 max_filtered_per_batch: int = 0) -> None:
        self.manager, self.source, self.cfg = manager, source, cfg
        self.group_hook, self.continuous = group_hook, continuous
        self.max_filtered = max_filtered_per_batch  # 0: no limit
        self._filtered_since_batch = 0
        self.target = cfg.in_flight_target(len(manager.urls))
        self._ids = itertools.count()
        self._queue: deque[Group] = deque()  # prompts to start before new ones (restored or restarted)
        self._running: dict[int, Group] = {}  # started, not yet accepted or filtered
        self._done: dict[str, deque[Group]] = {}  # accepted, waiting for a batch
        self._k = cfg.prompts_per_step
        self._quota: dict[str, int] = {}
        self._started = self._in_batch = False
        self._error: BaseException | None = None
        self._counts = {"filtered_groups": 0, "stale_dropped": 0, "aborted_tokens": 0}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sequence-scheduler", daemon=True)
        self._thread.start()
        self._gate = Gate()
        self._changed = asyncio.Event()
        self.dispatcher: Dispatcher = manager.dispatcher()
        self.dispatcher.gate = self._gate
        self._mark = (time.monotonic(), [0.0] * len(manager.urls))

    # ---- driver API (synchronous) ----------------------------------------------------------------
    def start(self, weight_version: int) -> None:
        """Begin (after load_state_dict, if any) with the engines serving `weight_version`."""
        self._call(self._start(weight_version))

    def next_batch(self, num_groups: int, policy_version: int) -> Batch:
        """Block until `num_groups` accepted groups, `source.quota(num_groups)` of each source."""
        if num_groups < 1:
            raise ValueError(f"next_batch: num_groups must be >= 1, got {num_groups}")
        if self.manager.engines is not None:  # restart dead servers between steps, as the batch path does
            self.manager.engines.ensure_alive()
        return self._call(self._next_batch(num_groups, policy_version))

    def pause(self) -> None:
        """Before a weight push: requests in flight come back with their partial output; nothing is sent."""
        self._call(self._pause())

    def resume(self, weight_version: int) -> None:
        """After the push: stale groups are dropped or regenerated; (continuous) generation goes on."""
        self._call(self._resume(weight_version))

    def state_dict(self) -> dict[str, Any]:
        """Everything in the scheduler, to resume exactly; only while nothing generates (paused, or sync
        mode between batches, or before start)."""
        return self._call(self._state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Before start(): the saved groups come first, before new prompts."""
        self._call(self._load_state_dict(state))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    # ---- on the scheduler's loop --------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start(self, weight_version: int) -> None:
        if self._started:
            raise RuntimeError("SequenceScheduler.start: already started")
        self._started = True
        self._mark = (time.monotonic(), self.dispatcher.busy_seconds())
        await self._drop_stale(weight_version)
        if self.continuous:
            self._quota = self.source.quota(self._k)
            self._refill()

    async def _next_batch(self, k: int, policy_version: int) -> Batch:
        if not self._started:
            raise RuntimeError("SequenceScheduler.next_batch: call start() first")
        self._k, self._quota = k, self.source.quota(k)
        self._in_batch = True
        try:
            if not self.continuous:  # sync: generation runs only in here (continuous: from start/resume on)
                self._gate.open()
            while True:
                self._raise_error()
                await self._drop_stale(policy_version, running=False)
                self._refill()
                if self._ready(policy_version):
                    break
                self._changed.clear()
                await self._changed.wait()
            groups = [g for s, q in self._quota.items() for g in self._pop(s, q, policy_version)]
            self._filtered_since_batch = 0
        finally:
            self._in_batch = False
            if not self.continuous:
                await self._pause()
        return Batch([g.samples for g in groups], self._stats(groups, policy_version))

    def _due(self, group: Group, policy_version: int) -> bool:
        """Whether the group must be in this batch: it would be past max_staleness after the next push, or it
        was thrown away once already (without this a long sequence could be restarted at every step end)."""
        if group.restarts:
            return True
        oldest = group.oldest_version()
        return oldest is not None and policy_version + 1 - oldest > self.cfg.max_staleness

    def _ready(self, policy_version: int) -> bool:
        """Every source has its quota of finished groups, and no group of it that is due is still running unless
        the quota is already filled with due groups: a long sequence is finished and trained before it goes
        stale or is thrown away a second time, so the scheduler does not favour short sequences."""
        for source, q in self._quota.items():
            done = self._done.get(source, ())
            if len(done) < q:
                return False
            if any(g.source == source and self._due(g, policy_version) for g in self._running.values()) \
                    and sum(self._due(g, policy_version) for g in done) < q:
                return False
        return True

    def _pop(self, source: str, q: int, policy_version: int) -> list[Group]:
        """The source's q finished groups: due ones first, then first finished first."""
        queue = list(self._done.get(source, ()))
        order = sorted(range(len(queue)), key=lambda i: (not self._due(queue[i], policy_version), i))[:q]
        taken = set(order)
        self._done[source] = deque(g for i, g in enumerate(queue) if i not in taken)
        return [queue[i] for i in sorted(taken)]

    async def _pause(self) -> None:
        if not self._gate.is_open:
            return
        self._gate.close()
        while any(self.dispatcher.in_flight):  # a request still on its way is caught by the next round
            await self.dispatcher.abort_in_flight()
            await self.dispatcher.wait_idle(timeout_s=0.02)
        if not self.cfg.partial_rollout:
            await self._restart_unfinished()

    async def _resume(self, weight_version: int) -> None:
        await self._drop_stale(weight_version)
        if self.continuous:
            self._gate.open()
            self._refill()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # ---- starting sequences -----------------------------------------------------------------------------
    def _refill(self) -> None:
        """Start groups while fewer than `target` sequences are in flight and the held groups stay within what
        max_staleness allows; a source short of its quota for the batch being assembled comes first."""
        if not self._gate.is_open or not (self.continuous or self._in_batch) or self._error is not None:
            return
        quota = {s: q for s, q in self._quota.items() if q > 0}
        cap = (self.cfg.max_staleness + int(self._in_batch)) * self._k
        while quota:
            held = {s: len(self._done.get(s, ())) for s in quota}
            for g in self._running.values():
                held[g.source] = held.get(g.source, 0) + 1
            short = [s for s in quota if held.get(s, 0) < quota[s]] if self._in_batch else []
            if not short and sum(held.values()) >= cap:
                return
            group = self._take(short or None, quota, held)
            in_flight = sum(g.unfinished for g in self._running.values())
            if in_flight and in_flight + group.unfinished > self.target:
                self._queue.appendleft(group)
                return
            self._launch(group)

    def _take(self, short: list[str] | None, quota: dict[str, int], held: dict[str, int]) -> Group:
        """The next group: a queued one (of a short source, if any is short), else a new prompt from the
        short source, or from the source furthest below its share."""
        for i, group in enumerate(self._queue):
            if short is None or group.source in short:
                del self._queue[i]
                return group
        candidates = short or list(quota)
        source = min(candidates, key=lambda s: held.get(s, 0) / quota[s])
        samples = self.source.next_group(source)
        if not samples:
            raise RuntimeError(f"data source {source!r} returned an empty group")
        return Group.fresh(next(self._ids), source, samples)

    def _launch(self, group: Group) -> None:
        self._running[group.id] = group
        pending = [i for i in range(len(group.samples)) if not group.finished[i]]
        if not pending:  # restored with every sample finished: only the hook is left
            group.tasks = [self._spawn(self._complete(group))]
            return
        group.tasks = [self._spawn(self._run_one(group, i)) for i in pending]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = self._loop.create_task(coro)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()
            self._changed.set()

    async def _run_one(self, group: Group, i: int) -> None:
        trajectory = self.manager.trajectory(self.dispatcher, group.samples[i], gate=self._gate,
                                             resume=group.resume[i])
        group.trajectories[i] = trajectory
        try:
            await self.manager.run_sample(trajectory)
        finally:
            group.trajectories.pop(i, None)
        group.finished[i] = True
        if not group.unfinished:
            await self._complete(group)
        else:
            self._refill()  # a group in flight leaves room for a new one only when it is whole

    async def _complete(self, group: Group) -> None:
        accepted = await self.group_hook(group.samples) if self.group_hook is not None else True
        del self._running[group.id]
        if accepted:
            self._done.setdefault(group.source, deque()).append(group)
        else:
            self._counts["filtered_groups"] += 1
            self._filtered_since_batch += 1
            if self.max_filtered and self._filtered_since_batch > self.max_filtered and self._error is None:
                self._error = RuntimeError(
                    f"dynamic sampling filtered {self._filtered_since_batch} groups while one batch of {self._k} was "
                    f"assembled (limit dynamic_sampling.max_filtered_batches x rollout.prompts_per_step = "
                    f"{self.max_filtered}): the groups have equal rewards and teacher KL below "
                    "dynamic_sampling.filter_kl_threshold; lower the threshold or set filter_groups=false")
        self._changed.set()
        self._refill()

    # ---- throwing work away -----------------------------------------------------------------------------
    async def _cancel(self, group: Group) -> None:
        self._running.pop(group.id, None)
        current = asyncio.current_task()
        tasks = [t for t in group.tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._counts["aborted_tokens"] += group.generated_tokens()

    def _requeue(self, groups: list[Group]) -> None:
        """Queue the prompts again from scratch, ahead of new ones, in their original order."""
        for group in reversed(groups):
            fresh = Group.fresh(next(self._ids), group.source, group.originals)
            fresh.restarts = group.restarts + 1
            self._queue.appendleft(fresh)

    async def _restart_unfinished(self) -> None:
        groups = [g for g in self._running.values() if g.unfinished]
        for group in groups:
            await self._cancel(group)
        self._requeue(groups)

    async def _drop_stale(self, version: int, *, running: bool = True) -> None:
        """Groups whose oldest token is more than max_staleness versions behind `version` go (counted); groups
        in flight are checked only while paused (`running`)."""
        limit = self.cfg.max_staleness

        def stale(g: Group) -> bool:
            oldest = g.oldest_version()
            return oldest is not None and version - oldest > limit

        dropped = [g for g in self._running.values() if stale(g)] if running else []
        for group in dropped:
            await self._cancel(group)
        for source, queue in self._done.items():
            old = [g for g in queue if stale(g)]
            self._done[source] = deque(g for g in queue if not stale(g))
            self._counts["aborted_tokens"] += sum(g.generated_tokens() for g in old)
            dropped += old
        old = [g for g in self._queue if stale(g)]
        self._queue = deque(g for g in self._queue if not stale(g))
        dropped += old
        self._counts["stale_dropped"] += len(dropped)
        if self.cfg.stale_policy == "regenerate":
            self._requeue(dropped)

    # ---- stats, state, shutdown -------------------------------------------------------------------------
    def _stats(self, groups: list[Group], policy_version: int) -> dict[str, float]:
        staleness = [policy_version - v for g in groups for s in g.samples
                     for v, m in zip(s.weight_versions, s.loss_mask) if m]
        now, busy = time.monotonic(), self.dispatcher.busy_seconds()
        then, busy_then = self._mark
        self._mark = (now, busy)
        wall = max(now - then, 1e-9)
        stats = {f"rollout/{name}": float(value) for name, value in self._counts.items()}
        self._counts = dict.fromkeys(self._counts, 0)
        stats.update({
            "rollout/staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
            "rollout/staleness_max": float(max(staleness, default=0)),
            "rollout/partial_samples": float(sum(bool(s.metadata.get("preemptions")) for g in groups
                                                 for s in g.samples)),
            "rollout/engine_busy_frac": sum(b - a for a, b in zip(busy_then, busy)) / (wall * len(busy)),
            "rollout/in_flight": float(sum(g.unfinished for g in self._running.values())),
        })
        return stats

    async def _state_dict(self) -> dict[str, Any]:
        if self._gate.is_open and (self._in_batch or self.continuous and self._started):
            raise RuntimeError("SequenceScheduler.state_dict: call it while paused (after pause(), or in sync "
                               "mode between next_batch and resume)")
        partial = self.cfg.partial_rollout
        running = sorted(self._running.values(), key=lambda g: g.id)
        return {
            "version": STATE_VERSION,
            "done": [finished_group_state(g) for q in self._done.values() for g in q],
            "groups": [group_state(g, keep_partial=[partial and not self.manager.loop_of(s).multi_turn
                                                    for s in g.samples]) for g in [*self._queue, *running]],
        }

    async def _load_state_dict(self, state: dict[str, Any]) -> None:
        if self._started or self._running or self._queue or self._done:
            raise RuntimeError("SequenceScheduler.load_state_dict: only on a new scheduler, before start()")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"scheduler state: version {state.get('version')!r}, expected {STATE_VERSION}")
        for saved in state["done"]:
            group = finished_group_from_state(next(self._ids), saved)
            self._done.setdefault(group.source, deque()).append(group)
        for saved in state["groups"]:
            self._queue.append(group_from_state(next(self._ids), saved))

    async def _close(self) -> None:
        await self._pause()
        for group in list(self._running.values()):
            await self._cancel(group)
        await self.dispatcher.close()
        hook_close = getattr(self.group_hook, "aclose", None)  # a hook that keeps connections (GroupScorer)
        if hook_close is not None:
            await hook_close()

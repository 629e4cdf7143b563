"""SandboxWorker's warm pools on real local sandboxes: a warm sandbox can hold a task's snapshot
(the session skips the upload), never serves another task, and is never handed out twice."""

from __future__ import annotations

import os

import pytest
import pytest_asyncio

from envs.sandbox.local import LocalSandboxBackend
from envs.swe.env import SWEEnv
from envs.swe.task import builtin_tasks, task_to_dict
from toolbox.worker import SandboxWorker

pytestmark = pytest.mark.asyncio
TASKS = {t.instance_id: t for t in builtin_tasks()}
A, B = TASKS["inflection__passersby"], TASKS["inflection__potatoes"]
GREP = {"name": "bash", "arguments": {"command": "grep -c tomat inflection/__init__.py"}}


@pytest_asyncio.fixture
async def worker():
    w = SandboxWorker("swe", max_turns=5, command_timeout=30)
    yield w
    await w.shutdown()


def _refuse_upload(sandboxes) -> None:
    """A preloaded sandbox must not be uploaded to again: make that an error the session reports."""

    async def refuse(*_args, **_kwargs):
        raise AssertionError("upload into a sandbox that already holds the snapshot")

    for sb in sandboxes:
        sb.upload = refuse


async def test_preloaded_sandbox_serves_its_task_without_upload(worker):
    assert await worker.prewarm(2, task_to_dict(A)) == 2
    preloaded = list(worker.warm[os.path.realpath(A.snapshot_dir)])
    _refuse_upload(preloaded)
    first = await worker.open("s1", task_to_dict(A))
    assert "inflection" in first
    sb = worker.sessions["s1"].sandbox
    assert sb in preloaded and sb.info["snapshot"] == os.path.realpath(A.snapshot_dir)
    step = await worker.step("s1", GREP)
    assert "[exit code: 0]" in step["observation"]
    assert (worker.warm_hits, worker.cold_starts) == (1, 0)
    stats = await worker.stats()
    assert stats["warm"] == stats["warm_preloaded"] == 1


async def test_other_tasks_snapshot_is_never_used_and_used_sandboxes_never_return(worker):
    await worker.prewarm(1, task_to_dict(A))
    held_a = worker.warm[os.path.realpath(A.snapshot_dir)][0]
    await worker.open("b", task_to_dict(B))  # nothing warm for B: a cold start with B's files
    sb_b = worker.sessions["b"].sandbox
    assert sb_b is not held_a and sb_b.info["snapshot"] == os.path.realpath(B.snapshot_dir)
    assert (worker.warm_hits, worker.cold_starts) == (0, 1)
    assert list(worker.warm[os.path.realpath(A.snapshot_dir)]) == [held_a]
    await worker.open("a", task_to_dict(A))
    assert worker.sessions["a"].sandbox is held_a
    await worker.close("a")
    assert not await held_a.alive()
    await worker.open("a2", task_to_dict(A))  # the pool is empty again: a fresh sandbox
    assert worker.sessions["a2"].sandbox is not held_a and worker.cold_starts == 2


async def test_empty_warm_sandbox_serves_any_task_and_is_refilled(worker):
    assert await worker.prewarm(1) == 1
    empty = worker.warm[None][0]
    assert empty.info["snapshot"] is None
    await worker.open("a", task_to_dict(A))  # the env uploads A's files into it
    assert worker.sessions["a"].sandbox is empty and worker.warm_hits == 1
    step = await worker.step("a", GREP)
    assert "[exit code: 0]" in step["observation"]
    await worker._refill
    assert len(worker.warm[None]) == 1 and worker.warm[None][0] is not empty


async def test_least_recently_prewarmed_snapshots_are_evicted():
    w = SandboxWorker("swe", max_preloaded=1)
    try:
        await w.prewarm(1, task_to_dict(A))
        old = w.warm[os.path.realpath(A.snapshot_dir)][0]
        await w.prewarm(1, task_to_dict(B))
        assert os.path.realpath(A.snapshot_dir) not in w.warm and not await old.alive()
        assert len(w.warm[os.path.realpath(B.snapshot_dir)]) == 1
    finally:
        await w.shutdown()


async def test_env_refuses_a_sandbox_holding_another_snapshot():
    backend = LocalSandboxBackend()
    sb = await backend.create(snapshot=B.snapshot_dir)

    async def factory():
        return sb

    env = SWEEnv(factory)
    try:
        with pytest.raises(ValueError, match="holds snapshot"):
            await env.reset(A)
    finally:
        await env.close()
    assert not await sb.alive()


async def test_prewarm_with_a_bad_task_names_the_field(worker):
    with pytest.raises(ValueError, match="snapshot"):
        await worker.prewarm(1, dict(task_to_dict(A), snapshot="/nonexistent/dir"))

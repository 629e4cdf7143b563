"""Toolbox + ToolManager on a real Ray cluster: warm pools, quotas, QPS, dead-actor replacement."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from envs.swe.task import builtin_tasks
from envs.tool_parsing import ToolCall
from toolbox.manager import ToolManager, percentile
from toolbox.ratelimit import TokenBucket
from toolbox.toolbox import get_or_create_toolbox

pytestmark = pytest.mark.asyncio(loop_scope="module")
TASK = {t.instance_id: t for t in builtin_tasks()}["inflection__potatoes"]
GOLD_EDIT = ToolCall(
    "str_replace",
    {"path": "inflection/__init__.py", "old": "(buffal|tomat)o$", "new": "(buffal|potat|tomat)o$"},
)


@pytest.fixture(scope="module")
def toolbox(ray_cluster):
    tb = get_or_create_toolbox(
        {"swe": {"workers": 2, "warm_per_worker": 1, "command_timeout": 30}},
        max_concurrent={"bash": 2},
        qps={"str_replace": 50},
    )
    ray.get(tb.prewarm.remote())
    yield tb
    ray.get(tb.shutdown.remote())
    ray.kill(tb)


async def test_named_toolbox_is_shared_and_prewarmed(toolbox):
    assert get_or_create_toolbox() == toolbox or ray.get(get_or_create_toolbox().stats.remote())["pools"]
    stats = await toolbox.stats.remote()
    assert all(w["warm"] >= 1 for w in stats["workers"]["swe"])


async def test_episode_through_manager_with_async_reward(toolbox):
    tm = ToolManager(toolbox, call_timeout_s=60)
    sid, obs = await tm.start("swe", TASK)
    assert "potato" in obs
    r = await tm.step(sid, GOLD_EDIT)
    assert "replaced 1" in r.observation
    r = await tm.step(
        sid,
        '<tool_call>{"name": "bash", "arguments": {"command": "grep -c potat inflection/__init__.py"}}</tool_call>',
    )
    assert r.observation.startswith("1")
    reward = await tm.reward_async(sid)
    assert reward == 1.0
    m = tm.metrics()
    assert (
        m["tools/str_replace/calls"] == 1 and m["tools/str_replace/p99_s"] >= m["tools/str_replace/p50_s"] > 0
    )
    stats = await toolbox.stats.remote()
    assert sum(w["warm_hits"] for w in stats["workers"]["swe"]) >= 1
    await asyncio.sleep(1.0)  # the taken warm sandbox is replaced in the background
    assert all(w["warm"] >= 1 for w in (await toolbox.stats.remote())["workers"]["swe"])
    assert (await tm.prewarm_for("swe", 4))["swe"] >= 4


async def test_prewarm_with_a_task_preloads_its_files(toolbox):
    tm = ToolManager(toolbox, call_timeout_s=60)
    assert (await tm.prewarm("swe", 1, TASK))["swe"] == 2  # one per worker, holding the snapshot
    stats = await toolbox.stats.remote()
    assert [w["warm_preloaded"] for w in stats["workers"]["swe"]] == [1, 1]
    sid, obs = await tm.start("swe", TASK)  # takes one of them: no upload, the files are there
    assert "potato" in obs
    r = await tm.step(sid, ToolCall("bash", {"command": "grep -c tomat inflection/__init__.py"}))
    assert r.observation.startswith("1")
    stats = await toolbox.stats.remote()
    assert sum(w["warm_preloaded"] for w in stats["workers"]["swe"]) == 1
    await tm.close(sid)


async def test_killed_worker_is_replaced_and_call_retried(toolbox):
    tm = ToolManager(toolbox, call_timeout_s=60)
    sid, _ = await tm.start("swe", TASK)
    await tm.step(sid, ToolCall("bash", {"command": "echo kept > note.txt"}))
    worker = await toolbox.session_worker.remote(sid)
    before = (await toolbox.stats.remote())["replaced_workers"]
    call = asyncio.ensure_future(tm.step(sid, ToolCall("bash", {"command": "sleep 2; cat note.txt"})))
    await asyncio.sleep(0.7)  # the call is inside the worker now
    ray.kill(worker)
    r = await call
    assert "kept" in r.observation, r  # replayed history restored the workspace on the new worker
    assert r.info["attempts"] == 2
    stats = await toolbox.stats.remote()
    assert stats["replaced_workers"] == before + 1 and stats["retried_calls"] >= 1
    assert (await toolbox.session_worker.remote(sid)) != worker
    await tm.close(sid)


async def test_lost_sandbox_and_timeout_are_recovered(toolbox):
    tm = ToolManager(toolbox, call_timeout_s=60)
    sid, _ = await tm.start("swe", TASK)
    await tm.step(sid, GOLD_EDIT)
    worker = await toolbox.session_worker.remote(sid)
    await worker.kill_sandbox.remote(sid)
    r = await tm.step(sid, ToolCall("bash", {"command": "grep -c potat inflection/__init__.py"}))
    assert r.observation.startswith("1") and r.info["attempts"] == 2
    retried = (await toolbox.stats.remote())["retried_calls"]
    r = await tm.step(sid, ToolCall("bash", {"command": "sleep 20"}), timeout=1.0)
    assert r.info["error"] == "timeout" and "timed out" in r.observation
    r = await tm.step(sid, ToolCall("bash", {"command": "grep -c potat inflection/__init__.py"}))
    assert r.observation.startswith("1")
    assert tm.metrics()["tools/bash/timeouts"] == 1
    await asyncio.sleep(1.0)
    assert (await toolbox.stats.remote())["retried_calls"] == retried  # the timed-out call was not retried
    assert await tm.reward_async(sid) == 1.0


async def test_quota_limits_concurrency(toolbox):
    tm = ToolManager(toolbox, call_timeout_s=60)
    sids = [(await tm.start("swe", TASK))[0] for _ in range(3)]
    t0 = time.monotonic()
    await asyncio.gather(*(tm.step(s, ToolCall("bash", {"command": "sleep 0.6"})) for s in sids))
    assert time.monotonic() - t0 >= 1.2  # 3 calls, 2 at a time
    assert (await toolbox.stats.remote())["peak_in_flight"]["bash"] == 2
    for s in sids:
        await tm.close(s)


async def test_token_bucket_rate():
    bucket = TokenBucket(rate=20, burst=2)
    t0 = time.monotonic()
    for _ in range(12):
        await bucket.acquire()
    assert 0.4 <= time.monotonic() - t0 < 2.0  # 10 tokens beyond the burst at 20/s
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0)


def test_percentile():
    assert percentile([], 50) == 0.0
    assert percentile([3, 1, 2], 50) == 2 and percentile(list(range(101)), 99) == 99

"""EnvSession episodes through ToolboxSessions -> ToolManager -> Toolbox (real embedded Ray) -> real
local sandboxes: graded episodes, error observations, a sandbox killed mid-episode, per-step metrics."""

from __future__ import annotations

import pytest
import ray

from envs.base import EnvSession
from envs.swe.task import builtin_tasks, task_to_dict
from envs.tool_parsing import ToolCall, format_tool_call
from toolbox.manager import ToolManager
from toolbox.session import ToolboxSessions
from toolbox.toolbox import get_or_create_toolbox

pytestmark = pytest.mark.asyncio(loop_scope="module")
TASK = {t.instance_id: t for t in builtin_tasks()}["inflection__potatoes"]
GOLD_EDIT = format_tool_call(
    ToolCall(
        "str_replace",
        {"path": "inflection/__init__.py", "old": "(buffal|tomat)o$", "new": "(buffal|potat|tomat)o$"},
    ),
    "hermes",
)
GREP = format_tool_call(ToolCall("bash", {"command": "grep -c potat inflection/__init__.py"}), "hermes")
FINISH = format_tool_call(ToolCall("finish", {}), "hermes")


@pytest.fixture(scope="module")
def toolbox(ray_cluster):
    tb = get_or_create_toolbox(
        {"swe": {"workers": 1, "warm_per_worker": 0, "command_timeout": 30}, "toy_tool": {"workers": 1}},
        name="mopd-toolbox-session-test",
    )
    yield tb
    ray.get(tb.shutdown.remote())
    ray.kill(tb)


@pytest.fixture
def sessions(toolbox):
    return ToolboxSessions(ToolManager(toolbox, call_timeout_s=60))


async def test_episode_is_graded_and_metered(sessions):
    assert await sessions.prewarm("swe", 2) >= 2
    episode = await sessions.open("swe", TASK)
    assert isinstance(episode, EnvSession)
    assert "potato" in await episode.reset()
    r = await episode.step(GOLD_EDIT)
    assert not r.done and "error" not in r.info and r.info["latency_s"] > 0
    r = await episode.step(FINISH)
    assert r.done and r.reward == 1.0 and r.info["latency_s"] > 0
    await episode.close()
    m = sessions.metrics()
    assert m["agent/tool_calls"] == 2 and m["agent/tool_errors"] == 0
    assert m["agent/tool_latency_p99_s"] >= m["agent/tool_latency_p50_s"] > 0
    assert sessions.metrics()["agent/tool_calls"] == 0  # counted per step


async def test_unfixed_bug_grades_zero_and_reset_starts_over(sessions):
    episode = await sessions.open("swe", task_to_dict(TASK))
    await episode.reset()
    await episode.step(GOLD_EDIT)
    assert "potato" in await episode.reset()  # a fresh workspace: the edit is gone
    r = await episode.step(FINISH)
    assert r.done and r.reward == 0.0
    await episode.close()


async def test_malformed_call_and_timeout_are_error_observations(toolbox):
    sessions = ToolboxSessions(ToolManager(toolbox, call_timeout_s=3))
    episode = await sessions.open("swe", TASK)
    await episode.reset()
    r = await episode.step('<tool_call>{"name": "bash", "arguments": {"command": </tool_call>')
    assert r.info["error"] == "parse" and not r.done and r.info["latency_s"] >= 0
    await episode.step(GOLD_EDIT)
    r = await episode.step(format_tool_call(ToolCall("bash", {"command": "sleep 20"}), "hermes"))
    assert r.info["error"] == "timeout" and not r.done
    r = await episode.step(GREP)  # restored with its history: the edit survived the timeout
    assert r.observation.startswith("1") and "error" not in r.info
    assert (await episode.step(FINISH)).reward == 1.0
    await episode.close()
    m = sessions.metrics()
    assert m["agent/tool_calls"] == 5 and m["agent/tool_errors"] == 2


async def test_sandbox_killed_at_call_two_the_episode_continues(sessions, toolbox):
    episode = await sessions.open("swe", TASK)
    await episode.reset()
    await episode.step(GOLD_EDIT)
    worker = await toolbox.session_worker.remote(episode.session_id)
    await worker.kill_sandbox.remote(episode.session_id)
    r = await episode.step(GREP)
    assert r.observation.startswith("1") and r.info["attempts"] == 2 and "error" not in r.info
    r = await episode.step(FINISH)
    assert r.done and r.reward == 1.0
    await episode.close()


async def test_bad_kind_or_task_fails_in_the_caller(sessions):
    with pytest.raises(ValueError, match="unknown env kind 'nope'"):
        await sessions.open("nope", TASK)
    with pytest.raises(ValueError, match="FAIL_TO_PASS"):
        await sessions.open("swe", dict(task_to_dict(TASK), FAIL_TO_PASS=[]))
    with pytest.raises(ValueError, match="n must be"):
        await sessions.prewarm("swe", -1)


async def test_another_kind_runs_through_the_same_toolbox(sessions):
    """The toy tool-use kind (envs/toy_tool.py) comes from the registry like SWE; its episode grades itself."""
    episode = await sessions.open("toy_tool", {"file": "k7", "value": "q4z1"})
    assert "k7" in await episode.reset()
    r = await episode.step(format_tool_call(ToolCall("bash", {"command": "cat k7"}), "hermes"))
    assert "q4z1" in r.observation and not r.done
    r = await episode.step("q4z1")
    assert r.done and r.reward == 1.0 and r.info["latency_s"] >= 0
    await episode.close()
    with pytest.raises(ValueError, match="`value`"):
        await sessions.open("toy_tool", {"file": "k7", "value": ""})

"""Malformed tool calls through the ToolManager and the Toolbox (real embedded Ray, real local
sandboxes): each comes back as an error observation the model can act on, never as an
"infrastructure" failure and never as an exception, and the session stays usable afterwards.
The env-level corpus (tests/envs/test_swe_tool_corpus.py) covers the cases one by one; this one
checks that the Ray path delivers them unchanged. Adding a case is one ``Case(...)`` line.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import pytest
import ray

from envs.swe.tools import TOOL_SCHEMAS
from envs.tool_parsing import ToolCall
from toolbox.manager import ToolManager, tool_label
from toolbox.toolbox import admission_key, get_or_create_toolbox

pytestmark = pytest.mark.asyncio(loop_scope="module")
LIMIT_S = 3.0  # the pool's configured command time limit
OUTSIDE = "/tmp/mopd-corpus-outside-ray"


@dataclass(frozen=True)
class Case:
    id: str
    action: Any
    expect: tuple[str, ...]
    setup: str = ""  # a bash command the model ran first (through the manager)
    done: bool = False
    max_s: float | None = None


# one line per case
# fmt: off
CASES = [
    Case("nan-timeout", '<tool_call>{"name": "bash", "arguments": {"command": "sleep 20; echo woke", "timeout": NaN}}</tool_call>', ("`timeout`", "timed out after 3s"), max_s=LIMIT_S + 8),
    Case("huge-int-timeout", ToolCall("bash", {"command": "echo hi", "timeout": 10**400}), ("hi", "`timeout`")),
    Case("nul-byte", ToolCall("bash", {"command": "echo a\x00b"}), ("NUL",)),
    Case("lone-surrogate", '<tool_call>{"name": "bash", "arguments": {"command": "echo \\ud800"}}</tool_call>', ("surrogate",)),
    Case("1mb-command", ToolCall("bash", {"command": "echo " + "x" * (1 << 20)}), ("`command` is",)),
    Case("413-read", ToolCall("str_replace", {"path": "big.bin", "old": "a", "new": "b"}), ("larger than",), setup="head -c 17000000 /dev/zero > big.bin"),
    Case("duplicate-keys", '<tool_call>{"name": "bash", "name": "finish", "arguments": {}}</tool_call>', ("duplicate key",)),
    Case("mixed-formats", '<tool_call>{"name": "bash", "arguments": {}}<function=bash><parameter=command>ls</parameter></function></tool_call>', ("not valid JSON",)),
    Case("symlink-path", ToolCall("str_replace", {"path": "l.py", "old": "a", "new": "b"}), ("link",), setup="ln -s /etc/passwd l.py"),
    Case("not-a-call", None, ("expected a tool call",)),
    Case("name-not-string", ToolCall(["bash"], {}), ('"name"',)),  # type: ignore[arg-type]
    Case("mopd-symlink-finish", '<tool_call>{"name": "finish", "arguments": {}}</tool_call>', ("Submitted",), setup=f"ln -s {OUTSIDE} .mopd", done=True),
]
# fmt: on


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Any]:
    repo = tmp_path_factory.mktemp("corpus-ray-repo")
    (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (repo / "test_calc.py").write_text("from calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n")
    patch = (
        "diff --git a/test_more.py b/test_more.py\nnew file mode 100644\n--- /dev/null\n+++ b/test_more.py\n"
        "@@ -0,0 +1,2 @@\n+def test_more():\n+    assert True\n"
    )
    return {
        "instance_id": "corpus__ray",
        "repo": "corpus/ray",
        "base_commit": "0" * 40,
        "problem_statement": "add() subtracts.",
        "patch": "",
        "test_patch": patch,
        "FAIL_TO_PASS": ["test_calc.py::test_add"],
        "PASS_TO_PASS": ["test_more.py::test_more"],
        "snapshot": str(repo),
    }


@pytest.fixture(scope="module")
def toolbox(ray_cluster):
    sandbox = {"file_size_mb": 40, "wall_timeout_s": 30.0, "cpu_time_s": 20, "memory_mb": 768}
    tb = get_or_create_toolbox(
        {"swe": {"workers": 1, "warm_per_worker": 1, "command_timeout": LIMIT_S, "sandbox": sandbox}},
        name="mopd-toolbox-corpus",
        max_concurrent={"bash": 1},
    )
    ray.get(tb.prewarm.remote())
    yield tb
    ray.get(tb.shutdown.remote())
    ray.kill(tb)


@pytest.fixture
def outside():
    os.makedirs(OUTSIDE, exist_ok=True)
    before = sorted(os.listdir(OUTSIDE))
    yield
    after = sorted(os.listdir(OUTSIDE))
    shutil.rmtree(OUTSIDE, ignore_errors=True)
    assert after == before, "the evaluation wrote through a planted symlink"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_malformed_call_through_manager(toolbox, task, outside, case: Case):
    tm = ToolManager(toolbox, call_timeout_s=60)
    sid, _ = await tm.start("swe", task)
    try:
        if case.setup:
            r = await tm.step(sid, ToolCall("bash", {"command": case.setup}))
            assert "[exit code: 0]" in r.observation, r
        t0 = time.monotonic()
        r = await tm.step(sid, case.action)
        elapsed = time.monotonic() - t0
        assert r.info.get("error") not in ("infrastructure", "timeout"), r
        for needle in case.expect:
            assert needle in r.observation, (needle, r.observation[:500], r.info)
        if case.max_s is not None:
            assert elapsed < case.max_s, f"took {elapsed:.1f}s: the configured limit was not applied"
        assert r.done == case.done, r
        if not case.done:
            after = await tm.step(sid, ToolCall("bash", {"command": "echo still-usable"}))
            assert "still-usable" in after.observation, after
        assert not tm.failures, tm.failures
    finally:
        await tm.close(sid)


async def test_text_calls_count_against_the_tool_quota(toolbox, task):
    """bash written as model text is admitted through the bash quota (1 at a time here)."""
    tm = ToolManager(toolbox, call_timeout_s=60)
    sids = [(await tm.start("swe", task))[0] for _ in range(2)]
    text = '<tool_call>{"name": "bash", "arguments": {"command": "sleep 0.8"}}</tool_call>'
    t0 = time.monotonic()
    await asyncio.gather(*(tm.step(s, text) for s in sids))
    assert time.monotonic() - t0 >= 1.6
    assert (await toolbox.stats.remote())["peak_in_flight"]["bash"] == 1
    for s in sids:
        await tm.close(s)


def test_metric_and_admission_keys_are_bounded():
    tools = TOOL_SCHEMAS
    assert tool_label("text", tools) == "text" and tool_label(ToolCall("bash", {}), tools) == "bash"
    assert tool_label(ToolCall("x" * 10_000, {}), tools) == "invalid" and tool_label(None, tools) == "invalid"
    assert admission_key('<tool_call>{"name": "str_replace", "arguments": {}}</tool_call>', tools) == "text"
    mimo_bash = "<tool_call><function=bash><parameter=command>ls</parameter></function></tool_call>"
    assert admission_key(mimo_bash, tools) == "bash"
    assert admission_key({"name": "\ud800", "arguments": {}}, tools) == "invalid"
    assert admission_key(mimo_bash, {}) == "text"  # a tool the session's kind does not have


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"command_timeout": float("nan")}, "command_timeout"),
        ({"command_timeout": float("inf")}, "command_timeout"),
        ({"command_timeout": -1}, "command_timeout"),
        ({"workers": 0}, "workers"),
        ({"max_turns": 1.5}, "max_turns"),
        ({"warm_per_worker": -1}, "warm_per_worker"),
    ],
)
def test_pool_limits_are_checked_when_the_toolbox_is_built(spec, field):
    from toolbox.toolbox import PoolSpec

    with pytest.raises(ValueError, match=f"`{field}`"):
        PoolSpec(**spec)


async def test_timeout_whose_recovery_fails_is_still_an_observation(toolbox, task, tmp_path):
    """The task's snapshot is gone when a timed-out call is recovered: step() still answers."""
    snapshot = tmp_path / "snapshot"
    shutil.copytree(task["snapshot"], snapshot)
    tm = ToolManager(toolbox, call_timeout_s=60)
    sid, _ = await tm.start("swe", dict(task, snapshot=str(snapshot)))
    shutil.rmtree(snapshot)
    r = await tm.step(sid, ToolCall("bash", {"command": "sleep 2.5"}), timeout=1.0)
    assert r.info["error"] == "infrastructure" and "could not be restored" in r.observation, r
    await tm.close(sid)

"""SWE environment on the vendored inflection tasks: gold patch -> 1, nothing -> 0, regressions -> 0."""

from __future__ import annotations

import json

import pytest

from envs.swe.env import SWEEnv
from envs.swe.grading import apply_patch, junit_key, junit_outcomes
from envs.swe.task import TaskError, builtin_tasks, load_task, task_from_dict
from envs.tool_parsing import ToolCall, format_tool_call

pytestmark = pytest.mark.asyncio
TASKS = {t.instance_id: t for t in builtin_tasks()}


def test_three_real_tasks_ship_with_license_and_gold_patch():
    assert len(TASKS) >= 3
    for task in TASKS.values():
        assert task.FAIL_TO_PASS and task.PASS_TO_PASS and task.patch.startswith("diff --git")
        assert task.snapshot_dir
        with open(f"{task.snapshot_dir}/LICENSE") as f:
            assert f.read().startswith("Copyright")


@pytest.mark.parametrize("instance_id", sorted(TASKS))
async def test_gold_patch_scores_one(backend, instance_id):
    task = TASKS[instance_id]
    env = SWEEnv(backend.create, max_turns=4)
    obs = await env.reset(task)
    assert task.problem_statement in obs and task.patch not in obs
    await apply_patch(env.sandbox, task.patch, "gold")
    result = await env.step(format_tool_call(ToolCall("finish", {}), "mimo"))
    await env.close()
    assert result.done and result.reward == 1.0, result.info


async def test_no_patch_scores_zero(backend):
    task = TASKS["inflection__potatoes"]
    env = SWEEnv(backend.create, max_turns=3)
    await env.reset(task)
    result = await env.step(ToolCall("finish", {}))
    await env.close()
    assert result.done and result.reward == 0.0 and result.info["failed_tests"] == task.FAIL_TO_PASS


async def test_fix_that_breaks_pass_to_pass_scores_zero(backend):
    """Fixes 'potato' through str_replace but drops 'buffalo' -> a PASS_TO_PASS test now fails."""
    task = TASKS["inflection__potatoes"]
    env = SWEEnv(backend.create, max_turns=5)
    await env.reset(task)
    r = await env.step(
        ToolCall(
            "str_replace",
            {"path": "inflection/__init__.py", "old": "(buffal|tomat)o$", "new": "(potat|tomat)o$"},
        )
    )
    assert "replaced 1 occurrence" in r.observation and not r.done
    r = await env.step(
        ToolCall(
            "bash", {"command": "python3 -c 'import inflection; print(inflection.pluralize(\"potato\"))'"}
        )
    )
    assert "potatoes" in r.observation
    result = await env.step(ToolCall("finish", {}))
    await env.close()
    assert result.reward == 0.0
    assert any("buffalo" in t for t in result.info["failed_tests"])
    assert not any("potato" in t for t in result.info["failed_tests"])


async def test_model_solves_titleize_through_tools(backend):
    task = TASKS["inflection__titleize-unicode"]
    env = SWEEnv(backend.create, max_turns=6)
    await env.reset(task)
    for old, new in (
        ('r"\\b(\'?[a-z])",', 'r"\\b(\'?\\w)",'),
        ("humanize(underscore(word))\n", "humanize(underscore(word)).title()\n"),
    ):
        text = format_tool_call(
            ToolCall("str_replace", {"path": "inflection/__init__.py", "old": old, "new": new})
        )
        r = await env.step("I will edit.\n" + text)
        assert "replaced 1" in r.observation, r.observation
    result = await env.step('<tool_call>{"name": "finish", "arguments": {}}</tool_call>')
    await env.close()
    assert result.reward == 1.0, result.info


async def test_tool_errors_are_observations_and_turn_limit_ends(backend):
    task = TASKS["inflection__passersby"]
    env = SWEEnv(backend.create, max_turns=4)
    await env.reset(task)
    r = await env.step(ToolCall("str_replace", {"path": "nope.py", "old": "a", "new": "b"}))
    assert "does not exist" in r.observation and not r.done
    r = await env.step(ToolCall("str_replace", {"path": "inflection/__init__.py", "old": '(r"', "new": "x"}))
    assert "occurs" in r.observation and "times" in r.observation
    r = await env.step("<tool_call>{broken</tool_call>")
    assert "not valid JSON" in r.observation and not r.done
    r = await env.step(
        ToolCall("str_replace", {"path": "inflection/__init__.py", "old": "no such text", "new": "b"})
    )
    assert "not found" in r.observation and r.done and r.reward == 0.0 and r.info["truncated"]
    r = await env.step(ToolCall("finish", {}))
    assert r.done and r.info["error"] == "episode_over"
    await env.close()


def test_task_validation_names_fields(tmp_path):
    with open(f"{TASKS['inflection__potatoes'].snapshot_dir}/../task.json") as f:
        good = json.load(f)
    for field, value, needle in (
        ("FAIL_TO_PASS", [], "at least one"),
        ("PASS_TO_PASS", "x", "must be a list"),
        ("snapshot", "missing-dir", "snapshot"),
    ):
        bad = dict(good, **{field: value})
        with pytest.raises(TaskError, match=needle):
            task_from_dict(bad, str(tmp_path))
    bad = dict(good)
    del bad["test_patch"]
    with pytest.raises(TaskError, match="test_patch"):
        task_from_dict(bad)
    with pytest.raises(TaskError, match="does not exist"):
        load_task(str(tmp_path / "nothing"))


def test_junit_report_keys_and_outcomes():
    assert junit_key("tests/a/test_x.py::TestC::test_m[a::b-c]") == ("tests.a.test_x.TestC", "test_m[a::b-c]")
    report = b"""<testsuites><testsuite>
      <testcase classname="t" name="a[x-y]"/>
      <testcase classname="t" name="b"><failure message="no"/></testcase>
      <testcase classname="t" name="c"/><testcase classname="t" name="c"><error message="teardown"/></testcase>
      <testcase classname="t" name="d"><skipped/></testcase>
    </testsuite></testsuites>"""
    assert junit_outcomes(report) == {
        ("t", "a[x-y]"): True,
        ("t", "b"): False,
        ("t", "c"): False,
        ("t", "d"): False,
    }

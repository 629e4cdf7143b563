"""The toy tool-use env on real local sandboxes: the answer is only in the sandbox, the env grades it."""

from __future__ import annotations

import json

import pytest

from envs.registry import EnvOptions, env_kind, make_env
from envs.tool_parsing import ToolCall, format_tool_call
from envs.toy_tasks import make_examples
from envs.toy_tool import ToyToolEnv, ToyToolTask, expert_messages

pytestmark = pytest.mark.asyncio
TASK = ToyToolTask("k7", "x3q9")


def call(command: str) -> str:
    return format_tool_call(ToolCall("bash", {"command": command})) + "<|im_end|>"


async def test_expert_episode_scores_one_and_sees_what_the_teacher_was_trained_on(backend):
    """The world's expert conversations (mopd/toy) assume these observations: checked on a real sandbox."""
    env = ToyToolEnv(backend.create)
    assert await env.reset(TASK) == "read k7"
    turns = expert_messages(TASK)
    first = await env.step(turns[0]["content"] + "<|im_end|>")
    assert (first.observation, first.done, first.reward) == (turns[1]["content"], False, 0.0)
    assert "error" not in first.info
    last = await env.step(turns[2]["content"] + "<|im_end|>")
    await env.close()
    assert last.done and last.reward == 1.0 and last.info["turn"] == 2


async def test_wrong_or_guessed_answer_scores_zero(backend):
    env = ToyToolEnv(backend.create)
    await env.reset(TASK)
    result = await env.step("x3q8<|im_end|>")
    assert result.done and result.reward == 0.0
    again = await env.step("x3q9")
    assert again.done and again.reward == 0.0 and again.info["error"] == "episode_over"
    await env.close()


async def test_malformed_calls_are_error_observations_and_cost_a_turn(backend):
    env = ToyToolEnv(backend.create, max_turns=5)
    await env.reset(TASK)
    for text, error, expected in (
        ('<tool_call>\n{"name": "bash", "arguments": {"command": "cat k7"}\n</tool_call>', "parse", "JSON"),
        ('<tool_call>\n{"name": "cat", "arguments": {"path": "k7"}}\n</tool_call>', "parse", "unknown tool"),
        ("<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"cat k7\"}}", "parse", "never closed"),
        (call("cat k7") + call("cat k7"), "parse", "one tool call per turn"),
    ):
        result = await env.step(text)
        assert not result.done and result.reward == 0.0, text
        assert result.info["error"] == error and expected in result.observation, (text, result.observation)
    result = await env.step(call("cat k7"))  # the fifth turn: the last one, and no answer given
    await env.close()
    assert result.done and result.reward == 0.0 and result.info["truncated"]
    assert result.observation.startswith("x3q9\n")


async def test_tool_errors_and_limits_come_back_as_observations(backend):
    env = ToyToolEnv(backend.create, max_turns=8, command_timeout=2.0, max_output=256)
    await env.reset(TASK)
    r = await env.step(call("cat nope"))
    assert "No such file" in r.observation and "[exit code: 1]" in r.observation and "error" not in r.info
    r = await env.step(call("true"))
    assert r.observation == "[no output]"
    r = await env.step(call("sleep 30"))
    assert "[timed out after 2s]" in r.observation
    r = await env.step(call("yes"))
    assert "[output exceeded 256 bytes; killed]" in r.observation
    r = await env.step(format_tool_call(ToolCall("bash", {"command": "cat k7\x00"})))
    assert r.info["error"] == "tool" and "NUL" in r.observation
    r = await env.step(format_tool_call(ToolCall("bash", {"command": "cat k7", "timeout": float("nan")})))
    assert r.observation.startswith("[argument `timeout`=nan") and "x3q9" in r.observation
    r = await env.step(ToolCall("bash", {"command": 7}))
    assert r.info["error"] == "parse" and "must be a string" in r.observation
    await env.close()


async def test_model_paths_stay_in_the_sandbox(backend):
    """The model reads outside the workdir only what the sandbox lets it; it never finds the answer there."""
    env = ToyToolEnv(backend.create)
    await env.reset(TASK)
    r = await env.step(call("cat ../k7 /tmp/k7 /k7"))
    assert r.observation.count("No such file") == 3 and "x3q9" not in r.observation
    r = await env.step(call("ls"))
    await env.close()
    assert r.observation == "k7\n"


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"file": "../k7", "value": "abcd"}, "file"),
        ({"file": "/etc/passwd", "value": "abcd"}, "file"),
        ({"file": "a/b", "value": "abcd"}, "file"),
        ({"file": "-rf", "value": "abcd"}, "file"),
        ({"file": "..", "value": "abcd"}, "file"),
        ({"file": "k7\n", "value": "abcd"}, "file"),
        ({"file": "k7; rm -rf .", "value": "abcd"}, "file"),
        ({"file": "x" * 65, "value": "abcd"}, "file"),
        ({"file": 7, "value": "abcd"}, "file"),
        ({"file": "k7", "value": ""}, "value"),
        ({"file": "k7", "value": "a\nb"}, "value"),
        ({"file": "k7", "value": " ab"}, "value"),
        ({"file": "k7", "value": 1234}, "value"),
        ({"file": "k7", "value": "abcd", "answer": "abcd"}, "answer"),
    ],
)
async def test_hostile_task_fields_are_refused_naming_the_field(task, field):
    with pytest.raises(ValueError, match=f"`{field}`|{field!r}"):
        ToyToolTask.from_dict(task)
    with pytest.raises(ValueError, match=f"`{field}`|{field!r}"):
        await ToyToolEnv(_no_sandbox).reset(task)


async def _no_sandbox():
    raise AssertionError("a refused task must not start a sandbox")


async def test_registered_kind_runs_data_rows(backend):
    """A data row of the `tool` domain is a task of the kind it names, built and run through the registry."""
    (row,) = make_examples("tool", 1, seed=3)
    row = json.loads(json.dumps(row))  # as the data loader reads it
    kind = env_kind(row["env"])
    task = kind.load_task(row["task"])
    assert kind.dump_task(task) == row["task"] and set(kind.tools) == {"bash"}
    env = make_env(row["env"], backend.create, EnvOptions(max_turns=3, command_timeout=5.0))
    assert await env.reset(task) == row["prompt"][0]["content"]
    r = await env.step(call(f"cat {task.file}"))
    assert r.observation == row["label"]
    r = await env.step(row["label"])
    await env.close()
    assert r.done and r.reward == 1.0

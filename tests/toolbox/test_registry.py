"""Env kinds by name (envs/registry.py): registration, lookup, task forms, and the config and
Toolbox checks built on it."""

from __future__ import annotations

import pytest

from envs import registry
from envs.base import StepResult
from envs.config import EnvConfig
from envs.registry import EnvOptions, env_kind, env_kinds, kind_tasks, load_task, make_env, register_env
from envs.swe.task import TASKS_DIR, builtin_tasks
from mopd.core.errors import ConfigError
from toolbox.toolbox import ToolboxImpl
from toolbox.worker import SandboxWorker

POTATOES = f"{TASKS_DIR}/inflection__potatoes"


@pytest.fixture
def kinds(monkeypatch):
    """Registrations made by a test vanish with it."""
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))


class Echo:
    def __init__(self, sandbox, options: EnvOptions) -> None:
        self.options = options

    async def reset(self, task: dict) -> str:
        return task["text"]

    async def step(self, action: str) -> StepResult:
        return StepResult(action, 1.0, True, {})

    async def close(self) -> None:
        return None


def test_shipped_kinds_register_themselves():
    assert {"swe", "toy_tool"} <= set(env_kinds())
    assert set(env_kind("swe").tools) == {"bash", "str_replace", "finish"}
    assert [t.instance_id for t in kind_tasks("swe")] == [t.instance_id for t in builtin_tasks()]
    task = builtin_tasks()[0]
    assert load_task("swe", env_kind("swe").dump_task(task)) == task


@pytest.mark.asyncio
async def test_a_new_kind_is_one_decorator(kinds):
    make_echo = register_env("echo", load_task=dict, tools={"say": {"properties": {}}})(Echo)
    env = make_env("echo", None, EnvOptions(max_turns=3))
    assert isinstance(env, Echo) and env.options.max_turns == 3
    assert await env.reset(load_task("echo", {"text": "hi"})) == "hi"
    assert "echo" in env_kinds()
    register_env("echo", load_task=dict, tools={})(make_echo)  # the same factory again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_env("echo", load_task=dict, tools={})(lambda sandbox, options: Echo(sandbox, options))
    with pytest.raises(ValueError, match="identifier"):
        register_env("no such", load_task=dict, tools={})
    with pytest.raises(ValueError, match="reads no task files"):
        kind_tasks("echo", ["/tmp"])
    with pytest.raises(ValueError, match="ships no tasks"):
        kind_tasks("echo")
    with pytest.raises(TypeError, match="JSON object"):
        env_kind("echo").dump_task(["not", "a", "dict"])


def test_unknown_kinds_are_refused_where_they_enter():
    with pytest.raises(ValueError, match=r"unknown env kind 'nope'; registered kinds: \("):
        make_env("nope", None)
    with pytest.raises(ValueError, match="toolbox.pools: unknown env kind 'nope'"):
        ToolboxImpl({"nope": {}})
    with pytest.raises(ValueError, match="unknown env kind 'nope'"):
        SandboxWorker("nope")


@pytest.mark.parametrize(
    "config,field",
    [
        (EnvConfig(kind="nope"), "env.kind"),
        (EnvConfig(kind="swe", max_turns=0), "env.max_turns"),
        (EnvConfig(tasks=[POTATOES]), "env.tasks"),
        (EnvConfig(kind="toy_tool", max_turns=3, tasks=[POTATOES]), "env.tasks"),
        (
            EnvConfig(kind="swe", max_turns=20, tasks=[POTATOES, "/no/such/dir"]),
            "env.tasks[1]",
        ),
        (EnvConfig(kind="swe", max_turns=20, tasks=[TASKS_DIR]), "env.tasks[0]"),
        (EnvConfig(kind="toy_tool", max_turns=1), "env.max_turns"),  # no turn left to answer an observation
        (EnvConfig(kind="toy_tool", max_turns=3, workers=0), "env.workers"),
        (EnvConfig(kind="toy_tool", max_turns=3, max_new_tokens=-1), "env.max_new_tokens"),
        (EnvConfig(domains=["tool"]), "env.domains"),  # verifiable: every domain is single-turn
        (EnvConfig(kind="toy_tool", max_turns=3, domains=[""]), "env.domains"),
    ],
)
def test_env_config_names_the_bad_field(config, field):
    with pytest.raises(ConfigError) as exc:
        config.validate()
    assert exc.value.field_name == field


def test_env_config_accepts_kinds_and_task_dirs():
    EnvConfig().validate()
    EnvConfig(kind="toy_tool", max_turns=4).validate()
    assert EnvConfig(kind="toy_tool", max_turns=4).episode_domains == {"toy_tool"}
    assert EnvConfig(kind="toy_tool", max_turns=4, domains=["tool"]).episode_domains == {"tool"}
    assert EnvConfig().episode_domains == set()
    EnvConfig(kind="swe", max_turns=20, tasks=[POTATOES]).validate()

"""SWE-style code environment: the model edits a repository through tools until it calls ``finish``.

Reward is 1 only when every FAIL_TO_PASS test passes and every PASS_TO_PASS test still passes,
measured after applying the task's ``test_patch`` (the model never sees the gold patch), on tests
the model cannot have tampered with (envs/swe/grading.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from envs.base import StepResult
from envs.config import check_episode_limits
from envs.registry import EnvOptions, SandboxFactory, register_env
from envs.sandbox.base import Sandbox
from envs.sandbox.client import SandboxError
from envs.swe.grading import evaluate, pristine_files
from envs.swe.task import SWETask, builtin_tasks, load_task, task_from_dict, task_to_dict
from envs.swe.tools import (
    DEFAULT_MAX_FILE_BYTES,
    TOOL_SCHEMAS,
    ToolError,
    bash,
    model_caused,
    refusal,
    str_replace,
)
from envs.tool_parsing import ToolCall, ToolCallError, check_tool_call, parse_tool_calls


class SWEEnv:
    """One trajectory on one task. ``sandbox_factory`` gives a fresh sandbox (local process or pod).

    ``step`` never raises because of what the model wrote: malformed calls, bad arguments and
    requests the sandbox refuses (4xx) become observations that say what was wrong. Only
    infrastructure failures (the sandbox unreachable or answering 5xx) raise ``SandboxError``, for the
    ToolManager / Toolbox to recover.
    """

    def __init__(
        self,
        sandbox_factory: SandboxFactory,
        max_turns: int = 20,
        command_timeout: float = 60.0,
        max_output: int = 16384,
        python: str | None = None,
        tool_format: str = "auto",
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        check_episode_limits(max_turns, command_timeout, max_output=max_output, max_file_bytes=max_file_bytes)
        if tool_format not in ("hermes", "mimo", "auto"):
            raise ValueError(f"tool_format must be 'hermes', 'mimo' or 'auto', got {tool_format!r}")
        self.sandbox_factory = sandbox_factory
        self.max_turns = max_turns
        self.command_timeout = float(command_timeout)
        self.max_output = max_output
        self.max_file_bytes = max_file_bytes
        self.python = python
        self.tool_format = tool_format
        self.task: SWETask | None = None
        self.sandbox: Sandbox | None = None
        self.pristine: dict[str, bytes] = {}  # the task's test and config files, restored for grading
        self.turns = 0
        self.done = False

    async def reset(self, task: SWETask) -> str:
        await self.close()
        self.task, self.turns, self.done = task, 0, False
        self.sandbox = await self.sandbox_factory()
        if task.snapshot_dir:
            # a warm sandbox may already hold the task's files (created with ``snapshot=``)
            held, wanted = self.sandbox.info.get("snapshot"), os.path.realpath(task.snapshot_dir)
            if held is None:
                await self.sandbox.upload(task.snapshot_dir)
            elif held != wanted:
                raise ValueError(
                    f"sandbox holds snapshot {held!r}, task {task.instance_id!r} needs {wanted!r}"
                )
        self.pristine = await pristine_files(self.sandbox, task)
        if self.python is None:
            self.python = self.sandbox.info.get("python") or (
                "python3" if self.sandbox.info.get("backend") != "local" else sys.executable
            )
        return first_observation(task, self.max_turns)

    def _usage(self) -> str:
        if self.tool_format == "mimo":
            return "<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>"
        return '<tool_call>{"name": "NAME", "arguments": {"ARG": VALUE}}</tool_call>'

    def _call(self, action: Any) -> ToolCall | str:
        """The one checked tool call in ``action``, or the error observation explaining why not."""
        if isinstance(action, str):
            parsed = parse_tool_calls(action, self.tool_format, TOOL_SCHEMAS)
            if not parsed.ok:
                return parsed.error_observation()
            if not parsed.calls:
                return f"Tool call error: no tool call found; call one tool per turn as {self._usage()}"
            if len(parsed.calls) > 1:
                return f"Tool call error: expected exactly one tool call per turn, got {len(parsed.calls)}"
            return parsed.calls[0]
        checked = check_tool_call(action, TOOL_SCHEMAS)
        if isinstance(checked, ToolCallError):
            return f"Tool call error: {checked.message}"
        return checked

    async def step(self, action: ToolCall | str) -> StepResult:
        """Run one tool call (or model text holding one). Malformed calls cost a turn and explain why."""
        if self.task is None or self.sandbox is None:
            raise RuntimeError("SWEEnv.step() called before reset()")
        if self.done:
            return StepResult("The episode is over.", 0.0, True, {"error": "episode_over"})
        self.turns += 1
        info: dict[str, Any] = {"turn": self.turns}
        call = self._call(action)
        if isinstance(call, str):
            return await self._after(call, dict(info, error="parse"))
        info["tool"] = call.name
        try:
            if call.name == "finish":
                return await self._finish(info)
            if call.name == "bash":
                obs = await bash(self.sandbox, call.arguments, self.command_timeout, self.max_output)
            else:
                obs = await str_replace(self.sandbox, call.arguments, self.max_file_bytes)
        except ToolError as exc:
            obs, info["error"] = str(exc), "tool"
        except SandboxError as exc:
            if not model_caused(exc):
                self.turns -= 1  # not the model's turn to lose: a retry of this call is free
                raise  # infrastructure: the worker replays the session on a fresh sandbox
            obs, info["error"] = f"{call.name}: the sandbox refused the request: {refusal(exc)}", "refused"
        return await self._after(obs, info)

    async def _after(self, obs: str, info: dict[str, Any]) -> StepResult:
        if self.turns >= self.max_turns:
            result = await self._finish(dict(info, truncated=True))
            return StepResult(_readable(obs + "\n" + result.observation), result.reward, True, result.info)
        return StepResult(_readable(obs), 0.0, False, info)

    async def _finish(self, info: dict[str, Any]) -> StepResult:
        assert self.task is not None and self.sandbox is not None
        # done only once evaluated: after an infrastructure failure (raised) the caller may retry
        ev = await evaluate(self.sandbox, self.task, self.pristine, self.python or "python3")
        self.done = True
        info.update(
            reward=ev.reward, failed_tests=ev.failed[:20], n_failed=len(ev.failed), n_passed=len(ev.passed)
        )
        obs = f"Submitted. {len(ev.passed)} required tests pass, {len(ev.failed)} fail."
        if ev.error:
            obs += f"\nThe tests could not run: {ev.error[-1000:]}"
            info["error"] = "evaluation"
        return StepResult(_readable(obs), ev.reward, True, info)

    async def close(self) -> None:
        if self.sandbox is not None:
            await self.sandbox.close()
            self.sandbox = None


def _load_swe_task(obj: dict[str, Any]) -> SWETask:
    return task_from_dict(obj, source="swe task")


def first_observation(task: SWETask, max_turns: int) -> str:
    """What ``reset`` answers: the repository, the issue and the tools (also a task's prompt row)."""
    return (
        f"Repository {task.repo} is checked out in the current directory.\n\n"
        f"Issue:\n{task.problem_statement}\n\nTools: bash(command, timeout?), "
        f"str_replace(path, old, new), finish(). You have {max_turns} turns."
    )


@register_env(
    "swe",
    load_task=_load_swe_task,
    tools=TOOL_SCHEMAS,
    dump_task=task_to_dict,
    read_task=load_task,
    builtin_tasks=builtin_tasks,
    first_observation=lambda task, options: first_observation(task, options.max_turns),
)
def make_swe_env(sandbox: SandboxFactory, options: EnvOptions) -> SWEEnv:
    """The registry's builder of kind ``swe`` (envs/registry.py)."""
    return SWEEnv(sandbox, max_turns=options.max_turns, command_timeout=options.command_timeout)


def _readable(text: str) -> str:
    """Observation text any tokenizer takes: lone surrogates (from echoed model input) become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")

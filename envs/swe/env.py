"""SWE-style code environment: the model edits a repository through tools until it calls ``finish``.

Reward is 1 only when every FAIL_TO_PASS test passes and every PASS_TO_PASS test still passes,
measured after applying the task's ``test_patch`` (the model never sees the gold patch).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from envs.base import StepResult
from envs.sandbox.base import Sandbox
from envs.swe.task import SWETask
from envs.swe.tools import TOOL_SCHEMAS, ToolError, bash, quote_all, str_replace
from toolbox.parsing import ToolCall, parse_tool_calls

SandboxFactory = Callable[[], Awaitable[Sandbox]]
_RESULT_RE = re.compile(r"^(PASSED|FAILED|ERROR|XPASS|XFAIL|SKIPPED) (\S.*?)(?: - .*)?$")


@dataclass
class Evaluation:
    reward: float
    passed: list[str]
    failed: list[str]  # required tests that did not pass
    output: str


def parse_pytest_report(output: str) -> dict[str, str]:
    """``pytest -rA`` short summary -> {test id: outcome}."""
    results: dict[str, str] = {}
    for line in output.splitlines():
        m = _RESULT_RE.match(line.strip())
        if m and "::" in m.group(2):
            results[m.group(2)] = m.group(1)
    return results


async def apply_patch(sb: Sandbox, patch: str, name: str, timeout: float = 60.0) -> None:
    """Apply a unified diff inside the sandbox (git apply, else patch -p1)."""
    if not patch.strip():
        return
    path = f".mopd/{name}.diff"
    await sb.write_file(path, patch)
    res = await sb.exec(
        f"(git apply --whitespace=nowarn {path} 2>&1 || patch -p1 --forward --batch < {path}) "
        f"&& rm -f {path}",
        timeout=timeout,
    )
    if res.exit_code != 0:
        raise ToolError(f"{name} does not apply:\n{res.output[-2000:]}")


async def evaluate(sb: Sandbox, task: SWETask, python: str, timeout: float = 300.0) -> Evaluation:
    """Apply the test patch, run the task's tests and compare with FAIL_TO_PASS / PASS_TO_PASS."""
    try:
        await apply_patch(sb, task.test_patch, "test_patch")
    except ToolError as exc:
        return Evaluation(0.0, [], task.FAIL_TO_PASS + task.PASS_TO_PASS, str(exc))
    cmd = (
        f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {python} -m pytest -rA -q -p no:cacheprovider --no-header "
        f"{quote_all(task.tests_to_run())}"
    )
    res = await sb.exec(cmd, timeout=timeout, max_output=8 << 20)
    outcomes = parse_pytest_report(res.output)
    required = task.FAIL_TO_PASS + task.PASS_TO_PASS
    failed = [t for t in required if outcomes.get(t) != "PASSED"]
    passed = [t for t in required if outcomes.get(t) == "PASSED"]
    return Evaluation(1.0 if not failed else 0.0, passed, failed, res.output[-4000:])


class SWEEnv:
    """One trajectory on one task. ``sandbox_factory`` gives a fresh sandbox (local process or pod)."""

    def __init__(
        self,
        sandbox_factory: SandboxFactory,
        max_turns: int = 20,
        command_timeout: float = 60.0,
        max_output: int = 16384,
        python: str | None = None,
        tool_format: str = "auto",
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.sandbox_factory = sandbox_factory
        self.max_turns = max_turns
        self.command_timeout = command_timeout
        self.max_output = max_output
        self.python = python
        self.tool_format = tool_format
        self.task: SWETask | None = None
        self.sandbox: Sandbox | None = None
        self.turns = 0
        self.done = False

    async def reset(self, task: SWETask) -> str:
        await self.close()
        self.task, self.turns, self.done = task, 0, False
        self.sandbox = await self.sandbox_factory()
        if task.snapshot_dir:
            await self.sandbox.upload(task.snapshot_dir)
        if self.python is None:
            self.python = self.sandbox.info.get("python") or (
                "python3" if self.sandbox.info.get("backend") != "local" else sys.executable
            )
        return (
            f"Repository {task.repo} is checked out in the current directory.\n\n"
            f"Issue:\n{task.problem_statement}\n\nTools: bash(command), str_replace(path, old, new), "
            f"finish(). You have {self.max_turns} turns."
        )

    async def step(self, action: ToolCall | str) -> StepResult:
        """Run one tool call (or model text holding one). Malformed calls cost a turn and explain why."""
        if self.task is None or self.sandbox is None:
            raise RuntimeError("SWEEnv.step() called before reset()")
        if self.done:
            return StepResult("The episode is over.", 0.0, True, {"error": "episode_over"})
        self.turns += 1
        info: dict[str, Any] = {"turn": self.turns}
        call = action
        if isinstance(action, str):
            parsed = parse_tool_calls(action, self.tool_format, TOOL_SCHEMAS)
            if not parsed.ok or len(parsed.calls) != 1:
                obs = (
                    parsed.error_observation()
                    if not parsed.ok
                    else (
                        f"Tool call error: expected exactly one tool call per turn, got {len(parsed.calls)}"
                    )
                )
                return await self._after(obs, dict(info, error="parse"))
            call = parsed.calls[0]
        info["tool"] = call.name
        try:
            if call.name == "finish":
                return await self._finish(info)
            if call.name == "bash":
                obs = await bash(self.sandbox, call.arguments, self.command_timeout, self.max_output)
            elif call.name == "str_replace":
                obs = await str_replace(self.sandbox, call.arguments)
            else:
                obs = f"Tool call error: unknown tool `{call.name}`; available: {sorted(TOOL_SCHEMAS)}"
                info["error"] = "unknown_tool"
        except ToolError as exc:
            obs, info["error"] = str(exc), "tool"
        return await self._after(obs, info)

    async def _after(self, obs: str, info: dict[str, Any]) -> StepResult:
        if self.turns >= self.max_turns:
            result = await self._finish(dict(info, truncated=True))
            return StepResult(obs + "\n" + result.observation, result.reward, True, result.info)
        return StepResult(obs, 0.0, False, info)

    async def _finish(self, info: dict[str, Any]) -> StepResult:
        assert self.task is not None and self.sandbox is not None
        self.done = True
        ev = await evaluate(self.sandbox, self.task, self.python or "python3")
        info.update(
            reward=ev.reward, failed_tests=ev.failed[:20], n_failed=len(ev.failed), n_passed=len(ev.passed)
        )
        return StepResult(
            f"Submitted. {len(ev.passed)} required tests pass, {len(ev.failed)} fail.", ev.reward, True, info
        )

    async def close(self) -> None:
        if self.sandbox is not None:
            await self.sandbox.close()
            self.sandbox = None

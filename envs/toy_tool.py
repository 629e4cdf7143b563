"""A toy tool-use environment where the tool matters: the answer is a random value in a sandbox file.

An episode (env kind ``toy_tool``): ``reset`` writes the task's value to the file it names in a
fresh sandbox and returns the question (``read k7``); the model calls ``bash`` (e.g. ``cat k7``),
reads the value in the tool response, and answers with a turn that holds no tool call. That answer
ends the episode with reward 1 when it is exactly the value, else 0 (the episode grades itself).
The value is 4 random characters, so without the tool call the model can only guess.

Tool calls are in the Hermes / Qwen3 format (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``)
and kept short on purpose: the toy tokenizer has one token per character (mopd/toy/tokenizer.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from envs.base import StepResult, show
from envs.config import check_episode_limits
from envs.registry import EnvOptions, SandboxFactory, register_env
from envs.sandbox.base import Sandbox
from envs.sandbox.client import SandboxError
from envs.swe.tools import (
    MAX_COMMAND_BYTES,
    ToolError,
    model_caused,
    refusal,
    text_argument,
    timeout_argument,
)
from envs.tool_parsing import ToolCall, ToolCallError, check_tool_call, format_tool_call, parse_tool_calls
from envs.toy_tasks import extract_answer, tool_question

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "bash": {
        "description": "Run a bash command in the working directory.",
        "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}},
        "required": ["command"],
    },
}
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # one plain name in the workdir
MAX_VALUE_CHARS = 64


@dataclass(frozen=True)
class ToyToolTask:
    file: str  # a plain file name in the sandbox workdir
    value: str  # its content, and the answer

    @classmethod
    def from_dict(cls, obj: Any) -> ToyToolTask:
        """The task from its JSON object (a data row's ``task``); ValueError naming the wrong field."""
        if not isinstance(obj, dict):
            raise ValueError(  # noqa: TRY004 - the registry's load_task contract: ValueError naming the field
                f"toy_tool task must be a JSON object with `file` and `value`, got {type(obj).__name__}"
            )
        unknown = sorted(set(obj) - {"file", "value"})
        if unknown:
            raise ValueError(f"toy_tool task: unknown field(s) {unknown}; expected `file` and `value`")
        file, value = obj.get("file"), obj.get("value")
        if not isinstance(file, str) or not _FILE_RE.fullmatch(file) or ".." in file:
            raise ValueError(
                f"toy_tool task field `file` must be a plain file name ({_FILE_RE.pattern}, no `..`), got {show(file)}"
            )
        if not isinstance(value, str) or not value or len(value) > MAX_VALUE_CHARS or not value.isprintable():
            raise ValueError(
                f"toy_tool task field `value` must be 1-{MAX_VALUE_CHARS} printable characters, got {show(value)}"
            )
        if value != value.strip():
            raise ValueError(f"toy_tool task field `value` must not start or end with spaces, got {show(value)}")
        return cls(file, value)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "value": self.value}


def expert_messages(task: ToyToolTask) -> list[dict[str, str]]:
    """What a perfect agent does after the question: read the file, then answer with its content.

    The tool message is the observation this env returns for that call (a test checks it on a real
    sandbox), so a teacher trained on these conversations sees at rollout what it saw in training.
    """
    call = format_tool_call(ToolCall("bash", {"command": f"cat {task.file}"}), "hermes")
    return [
        {"role": "assistant", "content": call},
        {"role": "tool", "content": task.value},
        {"role": "assistant", "content": task.value},
    ]


class ToyToolEnv:
    """One episode on one ``ToyToolTask``; ``sandbox_factory`` gives a fresh sandbox per episode.

    ``step`` never raises because of what the model wrote: a malformed call, a wrong argument or a
    request the sandbox refuses is an observation with ``info["error"]``, and costs a turn. Only
    infrastructure failures (the sandbox unreachable or answering 5xx) raise ``SandboxError``.
    """

    def __init__(
        self,
        sandbox_factory: SandboxFactory,
        max_turns: int = 4,
        command_timeout: float = 10.0,
        max_output: int = 2048,
    ) -> None:
        check_episode_limits(max_turns, command_timeout, max_output=max_output)
        self.sandbox_factory = sandbox_factory
        self.max_turns = max_turns
        self.command_timeout = float(command_timeout)
        self.max_output = max_output
        self.task: ToyToolTask | None = None
        self.sandbox: Sandbox | None = None
        self.turns = 0
        self.done = False

    async def reset(self, task: ToyToolTask | dict[str, Any]) -> str:
        """A fresh sandbox holding the task's file; returns the question (the domain's prompt text)."""
        task = task if isinstance(task, ToyToolTask) else ToyToolTask.from_dict(task)
        await self.close()
        self.task, self.turns, self.done = task, 0, False
        self.sandbox = await self.sandbox_factory()
        await self.sandbox.write_file(task.file, task.value)
        return tool_question(task.file)

    def _call(self, action: Any) -> ToolCall | str | None:
        """The one checked tool call in ``action``, None for a final answer, or an error observation."""
        if isinstance(action, str):
            parsed = parse_tool_calls(action, "hermes", TOOL_SCHEMAS)
            if not parsed.ok:
                return parsed.error_observation()
            if not parsed.calls:
                return None
            if len(parsed.calls) > 1:
                return f"Tool call error: expected one tool call per turn, got {len(parsed.calls)}"
            return parsed.calls[0]
        checked = check_tool_call(action, TOOL_SCHEMAS)
        return f"Tool call error: {checked.message}" if isinstance(checked, ToolCallError) else checked

    async def step(self, action: str | ToolCall) -> StepResult:
        """One model turn: a tool call runs in the sandbox; a turn without one is the final answer."""
        if self.task is None or self.sandbox is None:
            raise RuntimeError("ToyToolEnv.step() called before reset()")
        if self.done:
            return StepResult("The episode is over.", 0.0, True, {"error": "episode_over"})
        self.turns += 1
        info: dict[str, Any] = {"turn": self.turns}
        call = self._call(action)
        if call is None:
            assert isinstance(action, str)
            answer = extract_answer(action)  # the turn's text before its end-of-turn marker
            reward = 1.0 if answer == self.task.value else 0.0
            self.done = True
            return StepResult("", reward, True, dict(info, answer=show(answer, 200), reward=reward))
        if isinstance(call, str):
            return self._after(call, dict(info, error="parse"))
        info["tool"] = call.name
        try:
            obs = await self._bash(call.arguments)
        except ToolError as exc:
            obs, info["error"] = str(exc), "tool"
        except SandboxError as exc:
            if not model_caused(exc):
                self.turns -= 1  # not the model's turn to lose: a retry of this call is free
                raise
            obs, info["error"] = f"bash: the sandbox refused the request: {refusal(exc)}", "refused"
        return self._after(obs, info)

    async def _bash(self, args: dict[str, Any]) -> str:
        """The command's output, and a note only when something went wrong (short observations)."""
        assert self.sandbox is not None
        command = text_argument("bash", args, "command", max_bytes=MAX_COMMAND_BYTES, allow_nul=False,
                                allow_empty=False)
        timeout, note = timeout_argument("bash", args, self.command_timeout)
        res = await self.sandbox.exec(command, timeout=timeout, max_output=self.max_output)
        out = res.output
        if res.timed_out:
            out += f"\n[timed out after {timeout:g}s]"
        elif res.killed_reason == "output_limit":
            out += f"\n[output exceeded {self.max_output} bytes; killed]"
        elif res.truncated:
            out += "\n[output truncated]"
        if res.exit_code not in (0, None):
            out += f"\n[exit code: {res.exit_code}]"
        return note + out if out else note + "[no output]"

    def _after(self, obs: str, info: dict[str, Any]) -> StepResult:
        if self.turns >= self.max_turns:
            self.done = True
            return StepResult(_readable(obs + "\n[no turns left; no answer given]"), 0.0, True,
                              dict(info, truncated=True, reward=0.0))
        return StepResult(_readable(obs), 0.0, False, info)

    async def close(self) -> None:
        if self.sandbox is not None:
            sandbox, self.sandbox = self.sandbox, None
            await sandbox.close()


def _readable(text: str) -> str:
    """Observation text any tokenizer takes: lone surrogates (from echoed model input) become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


@register_env("toy_tool", load_task=ToyToolTask.from_dict, tools=TOOL_SCHEMAS, dump_task=ToyToolTask.to_dict)
def make_toy_tool_env(sandbox: SandboxFactory, options: EnvOptions) -> ToyToolEnv:
    """The registry's builder: the pool's turn and time limits, the toy's short output cap."""
    return ToyToolEnv(sandbox, max_turns=options.max_turns, command_timeout=options.command_timeout)

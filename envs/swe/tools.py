"""The code-environment tools, executed against any Sandbox (local process or pod)."""

from __future__ import annotations

import shlex
from typing import Any

from envs.sandbox.base import Sandbox
from envs.sandbox.client import SandboxError

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "bash": {
        "description": "Run a bash command in the repository.",
        "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}},
        "required": ["command"],
    },
    "str_replace": {
        "description": "Replace exactly one occurrence of `old` by `new` in file `path`.",
        "properties": {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
        "required": ["path", "old", "new"],
    },
    "finish": {"description": "Submit the current state of the repository for evaluation.", "properties": {}},
}


class ToolError(Exception):
    """A tool was used wrongly; the message is shown to the model as the observation."""


async def bash(sb: Sandbox, args: dict[str, Any], timeout: float, max_output: int) -> str:
    command = args.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ToolError("bash: argument `command` must be a non-empty string")
    try:
        t = min(float(args.get("timeout", timeout)), timeout)
    except (TypeError, ValueError):
        raise ToolError("bash: argument `timeout` must be a number of seconds") from None
    res = await sb.exec(command, timeout=t, max_output=max_output)
    note = ""
    if res.timed_out:
        note = f"\n[command timed out after {t:.0f}s and was killed]"
    elif res.killed_reason == "output_limit":
        note = f"\n[output exceeded {max_output} bytes; command killed]"
    elif res.truncated:
        note = "\n[output truncated]"
    return f"{res.output}{note}\n[exit code: {res.exit_code}]"


async def str_replace(sb: Sandbox, args: dict[str, Any]) -> str:
    path, old, new = args.get("path"), args.get("old"), args.get("new")
    for name, value in (("path", path), ("old", old), ("new", new)):
        if not isinstance(value, str):
            raise ToolError(f"str_replace: argument `{name}` must be a string")
    if not old:
        raise ToolError("str_replace: argument `old` must not be empty")
    try:
        text = await sb.read_file(path)
    except SandboxError as exc:
        if exc.status == 404:
            raise ToolError(f"str_replace: file {path!r} does not exist") from None
        if exc.status in (400, 403):
            raise ToolError(f"str_replace: {exc}") from None
        raise
    count = text.count(old)
    if count == 0:
        raise ToolError(f"str_replace: `old` was not found in {path}; nothing changed")
    if count > 1:
        raise ToolError(
            f"str_replace: `old` occurs {count} times in {path}; give more context so it is unique"
        )
    await sb.write_file(path, text.replace(old, new, 1))
    return f"Edited {path}: replaced 1 occurrence."


def quote_all(items: list[str]) -> str:
    return " ".join(shlex.quote(i) for i in items)

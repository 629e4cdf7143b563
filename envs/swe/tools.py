"""The code-environment tools, executed against any Sandbox (local process or pod).

Every argument comes from the model, so each is checked here before anything reaches the sandbox:
text must be sendable (no NUL where a shell or path cannot hold one, no lone surrogates, bounded
length) and numbers must be finite and within the configured limit. A value the model got wrong is
a ``ToolError`` whose message names the argument; an out-of-range ``timeout`` is clamped to the
configured limit (with a note), so no value from the model can switch a limit off.
"""

from __future__ import annotations

import base64
import math
import re
import shlex
from typing import Any

from envs.base import json_type, show
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

# The command travels as one argv string (bash -c CMD): Linux refuses one longer than 128 KiB
# (MAX_ARG_STRLEN) with "Argument list too long"; stay well below it.
MAX_COMMAND_BYTES = 100_000
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_NAME_BYTES = 255  # NAME_MAX, per path component
DEFAULT_MAX_FILE_BYTES = 16 << 20  # what str_replace reads or writes; the agent's default read limit
_SURROGATE = re.compile("[\ud800-\udfff]")
# 4xx answers the agent gives because of what the model asked for or left in its files, and 507
# (the sandbox's disk quota is full: the model's files filled it); the rest (401 wrong token, 407/408
# timeouts, 429 overload, other 5xx, no answer) are infrastructure failures
_NOT_MODEL_CAUSED = {401, 407, 408, 429}
_MODEL_CAUSED_5XX = {507}
_AGENT_PREFIX = re.compile(r"^agent /\w+: HTTP \d+: ")


class ToolError(Exception):
    """A tool was used wrongly; the message is shown to the model as the observation."""


def model_caused(exc: SandboxError) -> bool:
    """True when the agent refused the request because of the model's input or files (4xx, 507)."""
    return (
        400 <= exc.status < 500 and exc.status not in _NOT_MODEL_CAUSED
    ) or exc.status in _MODEL_CAUSED_5XX


def refusal(exc: SandboxError) -> str:
    """The agent's reason, without the transport prefix, for the model to read."""
    return show(_AGENT_PREFIX.sub("", str(exc)), 500)


def text_argument(
    tool: str,
    args: dict[str, Any],
    name: str,
    *,
    max_bytes: int,
    allow_nul: bool = True,
    allow_empty: bool = True,
) -> str:
    """A string argument that can be sent as it is, or a ToolError naming the argument."""
    value = args.get(name)
    if not isinstance(value, str):
        raise ToolError(f"{tool}: argument `{name}` must be a string, got {json_type(value)}")
    if not allow_empty and not value.strip():
        raise ToolError(f"{tool}: argument `{name}` must not be empty")
    if not allow_nul and "\x00" in value:
        raise ToolError(
            f"{tool}: argument `{name}` contains a NUL byte (\\x00) at position {value.index(chr(0))}; "
            "it cannot be passed on"
        )
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise ToolError(
            f"{tool}: argument `{name}` contains a lone surrogate (U+{ord(bad.group()):04X}) at position "
            f"{bad.start()}, which is not valid Unicode text"
        )
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise ToolError(f"{tool}: argument `{name}` is {size} bytes long; the limit is {max_bytes} bytes")
    return value


def number_argument(
    tool: str,
    args: dict[str, Any],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    integer: bool = False,
    low_inclusive: bool = True,
    clamp_to: float | None = None,
) -> tuple[float, str]:
    """A number from the model checked to be finite and within [low, high] (or (low, high]).

    Wrong types (strings, booleans, lists) are a ToolError naming the argument. A value out of range,
    NaN or infinite (including integers too large for a float) is replaced by ``clamp_to`` with a
    note for the model when ``clamp_to`` is given, else it is a ToolError naming the range. So the
    value returned is always finite and in range: nothing the model writes can switch a limit off.
    Returns (value, note); the note is "" when the model's value was used.
    """
    value = args.get(name)
    if value is None:
        return default, ""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolError(f"{tool}: argument `{name}` must be {kind}, got {json_type(value)}")
    if integer and isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        raise ToolError(f"{tool}: argument `{name}` must be {kind}, got {show(value)}")
    finite = isinstance(value, int) or math.isfinite(value)
    above = value >= low if low_inclusive else value > low
    if finite and above and value <= high:
        return (int(value) if integer else float(value)), ""
    bounds = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
    if clamp_to is None:
        raise ToolError(f"{tool}: argument `{name}` must be {kind} in {bounds}, got {show(value)}")
    used = int(clamp_to) if integer else float(clamp_to)
    return (
        used,
        f"[argument `{name}`={show(value)} is not {kind} in {bounds}; {clamp_to:g} was used instead]\n",
    )


def timeout_argument(tool: str, args: dict[str, Any], limit: float) -> tuple[float, str]:
    """The timeout to run with: the model's value when it is in (0, limit], else the limit (noted)."""
    return number_argument(tool, args, "timeout", limit, 0.0, limit, low_inclusive=False, clamp_to=limit)


def path_argument(tool: str, args: dict[str, Any]) -> str:
    path = text_argument(tool, args, "path", max_bytes=MAX_PATH_BYTES, allow_nul=False, allow_empty=False)
    for part in path.split("/"):
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise ToolError(
                f"{tool}: argument `path` has a component of {len(part.encode('utf-8'))} bytes "
                f"({show(part, 40)}); file names are at most {MAX_NAME_BYTES} bytes"
            )
    return path


async def bash(sb: Sandbox, args: dict[str, Any], timeout: float, max_output: int) -> str:
    """Run the model's command under ``timeout`` (the configured limit; the model may only lower it)."""
    command = text_argument(
        "bash", args, "command", max_bytes=MAX_COMMAND_BYTES, allow_nul=False, allow_empty=False
    )
    t, note = timeout_argument("bash", args, timeout)
    res = await sb.exec(command, timeout=t, max_output=max_output)
    tail = ""
    if res.timed_out:
        tail = f"\n[command timed out after {t:g}s and was killed]"
    elif res.killed_reason == "output_limit":
        tail = f"\n[output exceeded {max_output} bytes; command killed]"
    elif res.truncated:
        tail = "\n[output truncated]"
    return f"{note}{res.output}{tail}\n[exit code: {res.exit_code}]"


async def read_bytes(sb: Sandbox, path: str, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of a file (the agent answers 413 past that)."""
    reply = await sb.client.call("/read", {"path": path, "max_bytes": max_bytes})
    return base64.b64decode(reply["content_b64"])


async def str_replace(sb: Sandbox, args: dict[str, Any], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """Replace exactly one occurrence of ``old``; files larger than ``max_file_bytes`` are refused."""
    path = path_argument("str_replace", args)
    old = text_argument("str_replace", args, "old", max_bytes=max_file_bytes)
    new = text_argument("str_replace", args, "new", max_bytes=max_file_bytes)
    if not old:
        raise ToolError("str_replace: argument `old` must not be empty")
    try:
        data = await read_bytes(sb, path, max_file_bytes)
    except SandboxError as exc:
        if exc.status == 404:
            raise ToolError(f"str_replace: file {show(path, 200)!r} does not exist") from None
        if model_caused(exc):
            raise ToolError(f"str_replace: {refusal(exc)}") from None
        raise
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ToolError(
            f"str_replace: {show(path, 200)} is not UTF-8 text (byte {exc.start}); edit it with bash"
        ) from None
    count = text.count(old)
    if count == 0:
        raise ToolError(f"str_replace: `old` was not found in {show(path, 200)}; nothing changed")
    if count > 1:
        raise ToolError(
            f"str_replace: `old` occurs {count} times in {show(path, 200)}; give more context so it is unique"
        )
    out = text.replace(old, new, 1).encode("utf-8")
    if len(out) > max_file_bytes:
        raise ToolError(
            f"str_replace: the edited file would be {len(out)} bytes; the limit is {max_file_bytes} "
            "bytes; nothing changed"
        )
    try:
        await sb.write_file(path, out)
    except SandboxError as exc:
        if model_caused(exc):
            raise ToolError(f"str_replace: {refusal(exc)}; nothing changed") from None
        raise
    return f"Edited {show(path, 200)}: replaced 1 occurrence."


def quote_all(items: list[str]) -> str:
    return " ".join(shlex.quote(i) for i in items)

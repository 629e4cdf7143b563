"""Model output -> tool calls, for the two wire formats our students and teachers emit.

* ``hermes`` (Qwen3 / Hermes): ``<tool_call>{"name": "bash", "arguments": {...}}</tool_call>``
* ``mimo`` (MiMo-V2-Flash, SGLang ``--tool-call-parser mimo``; same as Qwen3-Coder):
  ``<tool_call>\\n<function=bash>\\n<parameter=command>ls</parameter>\\n</function>\\n</tool_call>``

Parsing never raises on model text: every malformed call becomes a ``ToolCallError`` whose
``message`` is written for the model to read, so an agent loop can feed it back as the observation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("hermes", "mimo", "auto")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_FUNC_RE = re.compile(r"<function=([^>\n]*)>(.*?)</function>", re.DOTALL)
_PARAM_RE = re.compile(r"<parameter=([^>\n]*)>(.*?)</parameter>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    message: str  # readable by the model
    raw: str  # the offending text, for logs


@dataclass
class ParseResult:
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    content: str = ""  # the text outside tool-call blocks

    @property
    def ok(self) -> bool:
        return not self.errors

    def error_observation(self) -> str:
        """One message that tells the model what was wrong and what the expected format is."""
        return "\n".join(f"Tool call error: {e.message}" for e in self.errors)


def _blocks(text: str) -> tuple[list[str], list[ToolCallError], str]:
    """Split text into tool-call bodies; an unclosed block is an error, not a crash."""
    bodies: list[str] = []
    errors: list[ToolCallError] = []
    content_parts: list[str] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            content_parts.append(text[pos:])
            break
        content_parts.append(text[pos:start])
        end = text.find(CLOSE, start + len(OPEN))
        nested = text.find(OPEN, start + len(OPEN))
        if end < 0:
            errors.append(
                ToolCallError(f"`{OPEN}` is never closed with `{CLOSE}`", text[start : start + 200])
            )
            break
        if 0 <= nested < end:
            errors.append(ToolCallError(f"`{OPEN}` opened again before `{CLOSE}`", text[start:nested][:200]))
            pos = nested
            continue
        bodies.append(text[start + len(OPEN) : end])
        pos = end + len(CLOSE)
    stray = "".join(content_parts)
    if CLOSE in stray:
        errors.append(ToolCallError(f"`{CLOSE}` without a matching `{OPEN}`", stray[:200]))
    return bodies, errors, stray.replace(CLOSE, "").strip()


def _parse_hermes(body: str) -> ToolCall | ToolCallError:
    raw = body.strip()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        return ToolCallError(
            f'the tool call is not valid JSON ({exc}); expected {{"name": "<tool>", "arguments": {{...}}}}',
            raw[:200],
        )
    if not isinstance(obj, dict):
        return ToolCallError(f"the tool call must be a JSON object, got {type(obj).__name__}", raw[:200])
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCallError('the tool call needs a string field "name"', raw[:200])
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return ToolCallError(f'"arguments" of `{name}` is a string that is not a JSON object', raw[:200])
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ToolCallError(
            f'"arguments" of `{name}` must be a JSON object, got {type(args).__name__}', raw[:200]
        )
    return ToolCall(name.strip(), args)


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _convert(value: str, schema: dict[str, Any] | None) -> Any:
    """MiMo parameters are text; convert by the tool's JSON-schema type when we know it."""
    kind = (schema or {}).get("type", "string")
    if kind == "string":
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return value


def _parse_mimo(body: str, tools: dict[str, dict[str, Any]] | None) -> ToolCall | ToolCallError:
    match = _FUNC_RE.search(body)
    if match is None:
        return ToolCallError(
            "expected `<function=NAME>` ... `</function>` inside the tool call", body.strip()[:200]
        )
    name = match.group(1).strip()
    if not name:
        return ToolCallError("`<function=...>` has an empty name", body.strip()[:200])
    inner = match.group(2)
    props = ((tools or {}).get(name) or {}).get("properties", {})
    args: dict[str, Any] = {}
    for pmatch in _PARAM_RE.finditer(inner):
        pname = pmatch.group(1).strip()
        if not pname:
            return ToolCallError(f"a `<parameter=...>` of `{name}` has an empty name", body.strip()[:200])
        args[pname] = _convert(_strip_one_newline(pmatch.group(2)), props.get(pname))
    leftover = _PARAM_RE.sub("", inner)
    if "<parameter=" in leftover:
        return ToolCallError(
            f"a `<parameter=...>` of `{name}` is not closed with `</parameter>`", body.strip()[:200]
        )
    return ToolCall(name, args)


def parse_tool_calls(
    text: str,
    fmt: str = "auto",
    tools: dict[str, dict[str, Any]] | None = None,
) -> ParseResult:
    """Extract tool calls from model text.

    ``tools`` maps tool name -> JSON schema of its parameters (``{"properties": ..., "required": [...]}``);
    when given, unknown tools and missing required arguments are reported as errors too.
    """
    if fmt not in FORMATS:
        raise ValueError(f"tool-call format must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(text, str):
        return ParseResult(
            errors=[ToolCallError(f"model output must be text, got {type(text).__name__}", "")]
        )
    bodies, errors, content = _blocks(text)
    result = ParseResult(errors=list(errors), content=content)
    for body in bodies:
        use = fmt
        if use == "auto":
            use = "mimo" if "<function=" in body else "hermes"
        parsed = _parse_mimo(body, tools) if use == "mimo" else _parse_hermes(body)
        if isinstance(parsed, ToolCall) and tools is not None:
            parsed = _check_against(parsed, tools)
        (result.calls if isinstance(parsed, ToolCall) else result.errors).append(parsed)
    return result


def _check_against(call: ToolCall, tools: dict[str, dict[str, Any]]) -> ToolCall | ToolCallError:
    if call.name not in tools:
        return ToolCallError(f"unknown tool `{call.name}`; available tools: {sorted(tools)}", call.name)
    missing = [r for r in tools[call.name].get("required", []) if r not in call.arguments]
    if missing:
        return ToolCallError(f"tool `{call.name}` is missing required argument(s) {missing}", call.name)
    return call


def format_tool_call(call: ToolCall, fmt: str = "hermes") -> str:
    """Render a call in a wire format (used for prompts, few-shot examples and round-trip tests)."""
    if fmt == "hermes":
        return f"{OPEN}\n{json.dumps({'name': call.name, 'arguments': call.arguments})}\n{CLOSE}"
    if fmt == "mimo":
        params = "".join(
            f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
            for k, v in call.arguments.items()
        )
        return f"{OPEN}\n<function={call.name}>\n{params}</function>\n{CLOSE}"
    raise ValueError(f"tool-call format must be 'hermes' or 'mimo', got {fmt!r}")

"""Model output -> tool calls, for the two wire formats our students and teachers emit.

* ``hermes`` (Qwen3 / Hermes): ``<tool_call>{"name": "bash", "arguments": {...}}</tool_call>``
* ``mimo`` (MiMo-V2-Flash, SGLang ``--tool-call-parser mimo``; same as Qwen3-Coder):
  ``<tool_call>\\n<function=bash>\\n<parameter=command>ls</parameter>\\n</function>\\n</tool_call>``

Parsing never raises on model text: every malformed call becomes a ``ToolCallError`` whose
``message`` is written for the model to read, so an agent loop can feed it back as the observation.
With ``tools`` (name -> JSON schema of the parameters) every call is also checked against its schema:
unknown tools, unknown or missing arguments and arguments of the wrong JSON type are errors too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from envs.base import JSON_TYPES, json_type, show

FORMATS = ("hermes", "mimo", "auto")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_FUNC_OPEN = "<function="
_FUNC_RE = re.compile(r"<function=([^>\n]*)>(.*?)</function>", re.DOTALL)
_PARAM_RE = re.compile(r"<parameter=([^>\n]*)>(.*?)</parameter>", re.DOTALL)
MAX_REPORTED_ERRORS = 5  # an observation lists this many parse errors, then a count


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

    def error_observation(self, limit: int = MAX_REPORTED_ERRORS) -> str:
        """One message that tells the model what was wrong (the first ``limit`` errors, then a count)."""
        lines = [f"Tool call error: {e.message}" for e in self.errors[:limit]]
        if len(self.errors) > limit:
            lines.append(f"Tool call error: ... and {len(self.errors) - limit} more malformed tool calls")
        return "\n".join(lines)


def _blocks(text: str) -> tuple[list[str], list[ToolCallError], str]:
    """Split text into tool-call bodies; an unclosed block is an error, not a crash. Linear time:
    the next `</tool_call>` is searched once, not again for every nested `<tool_call>`."""
    bodies: list[str] = []
    errors: list[ToolCallError] = []
    content_parts: list[str] = []
    pos = 0
    end = -1
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            content_parts.append(text[pos:])
            break
        content_parts.append(text[pos:start])
        if end < start + len(OPEN):
            end = text.find(CLOSE, start + len(OPEN))
        nested = text.find(OPEN, start + len(OPEN), end if end >= 0 else len(text))
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
    if not bodies and not errors and (_FUNC_OPEN in stray or "<parameter=" in stray):
        errors.append(
            ToolCallError(
                f"`<function=...>` / `<parameter=...>` found outside `{OPEN}` ... `{CLOSE}`; "
                f"wrap the call in `{OPEN}`",
                stray[:200],
            )
        )
    return bodies, errors, stray.replace(CLOSE, "").strip()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _loads(text: str) -> Any:
    """json.loads that refuses duplicate keys (the model meant one of them; we cannot tell which)."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


def _json_error(exc: BaseException) -> str:
    if isinstance(exc, _DuplicateKey):
        return f'duplicate key "{show(exc.key)}" in a JSON object'
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return show(str(exc), 200)


_EXPECTED = f'expected {OPEN}{{"name": "<tool>", "arguments": {{...}}}}{CLOSE}'


def _parse_hermes(body: str) -> ToolCall | ToolCallError:
    raw = body.strip()
    try:
        obj = _loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, duplicates, > 4300-digit ints
        return ToolCallError(f"the tool call is not valid JSON ({_json_error(exc)}); {_EXPECTED}", raw[:200])
    if not isinstance(obj, dict):
        return ToolCallError(f"the tool call must be a JSON object, got {json_type(obj)}", raw[:200])
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCallError('the tool call needs a string field "name"', raw[:200])
    shown = show(name.strip())
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = _loads(args) if args.strip() else {}
        except (ValueError, RecursionError) as exc:
            return ToolCallError(
                f'"arguments" of `{shown}` is a string that is not a JSON object ({_json_error(exc)})',
                raw[:200],
            )
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ToolCallError(
            f'"arguments" of `{shown}` must be a JSON object, got {json_type(args)}', raw[:200]
        )
    return ToolCall(name.strip(), args)


def _strip_one_newline(value: str) -> str:
    value = value.removeprefix("\n")
    value = value.removesuffix("\n")
    return value


def _convert(value: str, schema: dict[str, Any] | None) -> Any:
    """MiMo parameters are text; convert by the tool's JSON-schema type when we know it."""
    kind = (schema or {}).get("type", "string")
    if kind == "string":
        return value
    try:
        return _loads(value)
    except (ValueError, RecursionError):
        return value  # left as text: the schema check names the argument and the expected type


def _parse_mimo(body: str, tools: dict[str, dict[str, Any]] | None) -> ToolCall | ToolCallError:
    raw = body.strip()
    first, last_close = body.find(_FUNC_OPEN), body.rfind("</function>")
    # without a `</function>` after the first `<function=`, the regex would rescan the rest of the
    # body from every later `<function=` (quadratic on hostile text): answer before searching
    match = _FUNC_RE.search(body, first, last_close + len("</function>")) if 0 <= first < last_close else None
    if match is None:
        return ToolCallError("expected `<function=NAME>` ... `</function>` inside the tool call", raw[:200])
    name = match.group(1).strip()
    if not name:
        return ToolCallError("`<function=...>` has an empty name", raw[:200])
    shown = show(name)
    outside = (body[: match.start()] + body[match.end() :]).strip()
    if _FUNC_OPEN in outside:
        return ToolCallError(
            "more than one `<function=...>` in one tool call; put each call in its own "
            f"`{OPEN}` (one call per turn)",
            raw[:200],
        )
    if outside:
        return ToolCallError(
            f"text outside `<function={shown}>` ... `</function>` inside the tool call: {show(outside)}",
            raw[:200],
        )
    inner = match.group(2)
    closed = inner.rfind("</parameter>") + len("</parameter>")
    if "<parameter=" in inner[max(closed, 0) :]:  # checked before the regex runs (see above)
        return ToolCallError(f"a `<parameter=...>` of `{shown}` is not closed with `</parameter>`", raw[:200])
    props = ((tools or {}).get(name) or {}).get("properties", {})
    args: dict[str, Any] = {}
    for pmatch in _PARAM_RE.finditer(inner):
        pname = pmatch.group(1).strip()
        if not pname:
            return ToolCallError(f"a `<parameter=...>` of `{shown}` has an empty name", raw[:200])
        if pname in args:
            return ToolCallError(f"parameter `{show(pname)}` of `{shown}` is given more than once", raw[:200])
        args[pname] = _convert(_strip_one_newline(pmatch.group(2)), props.get(pname))
    leftover = _PARAM_RE.sub("", inner)
    if "<parameter=" in leftover:
        return ToolCallError(f"a `<parameter=...>` of `{shown}` is not closed with `</parameter>`", raw[:200])
    if leftover.strip():
        return ToolCallError(
            f"`<function={shown}>` holds text outside `<parameter=NAME>` ... `</parameter>`: "
            f"{show(leftover.strip())}",
            raw[:200],
        )
    return ToolCall(name, args)


def _detect(body: str) -> str:
    """A body that starts like JSON is hermes (its strings may mention `<function=`), else mimo."""
    head = body.lstrip()
    if head.startswith(("{", "[")):
        return "hermes"
    return "mimo" if _FUNC_OPEN in body else "hermes"


def parse_tool_calls(
    text: str,
    fmt: str = "auto",
    tools: dict[str, dict[str, Any]] | None = None,
) -> ParseResult:
    """Extract tool calls from model text.

    ``tools`` maps tool name -> JSON schema of its parameters (``{"properties": ..., "required": [...]}``);
    when given, every call is checked against it (see ``check_tool_call``).
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
        use = _detect(body) if fmt == "auto" else fmt
        parsed = _parse_mimo(body, tools) if use == "mimo" else _parse_hermes(body)
        if isinstance(parsed, ToolCall) and tools is not None:
            parsed = check_tool_call(parsed, tools)
        (result.calls if isinstance(parsed, ToolCall) else result.errors).append(parsed)
    return result


def check_tool_call(call: Any, tools: dict[str, dict[str, Any]]) -> ToolCall | ToolCallError:
    """Check a parsed (or caller-built) call against the tool schemas; errors name what was wrong."""
    if not isinstance(call, ToolCall):
        return ToolCallError(f"expected a tool call, got {type(call).__name__}", show(call, 200))
    if not isinstance(call.name, str) or not call.name.strip():
        return ToolCallError('the tool call needs a string field "name"', show(call.name, 200))
    shown = show(call.name)
    if call.name not in tools:
        return ToolCallError(f"unknown tool `{shown}`; available tools: {sorted(tools)}", call.name[:200])
    if not isinstance(call.arguments, dict):
        return ToolCallError(
            f'"arguments" of `{shown}` must be a JSON object, got {json_type(call.arguments)}', call.name
        )
    schema = tools[call.name]
    props: dict[str, Any] = schema.get("properties", {})
    unknown = [k for k in call.arguments if k not in props]
    if unknown:
        expected = ", ".join(f"`{p}`" for p in props) or "none"
        return ToolCallError(
            f"unknown argument `{show(unknown[0])}` for tool `{shown}`; its arguments are: {expected}",
            call.name,
        )
    missing = [r for r in schema.get("required", []) if r not in call.arguments]
    if missing:
        return ToolCallError(f"tool `{shown}` is missing required argument(s) {missing}", call.name)
    for key, value in call.arguments.items():
        kind = props[key].get("type") if isinstance(props[key], dict) else None
        allowed = JSON_TYPES.get(kind) if isinstance(kind, str) else None
        if allowed is None:
            continue
        if isinstance(value, bool) and kind != "boolean" or not isinstance(value, allowed):
            return ToolCallError(
                f"tool `{shown}`: argument `{key}` must be a {kind}, got {json_type(value)}", call.name
            )
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

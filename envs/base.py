"""The environment contract: ``reset(task) -> observation`` and
``step(action) -> (observation, reward, done, info)``.

Async so that many trajectories share one event loop while their sandboxes work.

The step contract: whatever the model wrote (malformed or mixed-format tool calls, bad argument
types, NaN or huge numbers, NUL bytes, lone surrogates, requests the sandbox refuses with a 4xx)
comes back as an observation that says what was wrong, with ``info["error"]`` naming the kind, and
no number from the model can lift a configured limit. ``step`` raises only for infrastructure
failures (the sandbox unreachable or answering 5xx), which the ToolManager / Toolbox recover.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable


class StepResult(NamedTuple):
    observation: str
    reward: float
    done: bool
    info: dict[str, Any]


@runtime_checkable
class Env(Protocol):
    async def reset(self, task: Any) -> str: ...

    async def step(self, action: Any) -> StepResult: ...

    async def close(self) -> None: ...



@runtime_checkable
class EnvSession(Protocol):
    """One episode as the agent loop (rollout/agent_loop.py) sees it; the ToolManager provides it.

    ``step`` takes the model's whole turn as text (the environment parses the tool call) and never
    raises for anything the model wrote: a malformed call is an observation with ``info["error"]``.
    When ``done``, ``reward`` is the environment's grade of the episode; ``info["latency_s"]`` is the
    tool call's wall time.
    """

    async def reset(self) -> str: ...

    async def step(self, model_text: str) -> StepResult: ...

    async def close(self) -> None: ...

# -- quoting what the model wrote back to it (used by every tool layer) ----------------------------
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}
_SHOWN = 80  # longest name quoted back to the model


def show(value: Any, limit: int = _SHOWN) -> str:
    """A model-chosen value quoted back safely: escaped (NUL, surrogates), and cut to ``limit``."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {len(str(abs(value))) if value.bit_length() < 14000 else 'over 4000'} digits>"
    text = value if isinstance(value, str) else repr(value)
    head = text[:limit]
    head = head.encode("unicode_escape").decode("ascii")[:limit] if not head.isprintable() else head
    return head if len(text) <= limit else head + f"... ({len(text)} chars)"


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages the model reads."""
    if isinstance(value, bool):
        return "boolean"
    for name in ("string", "integer", "number", "object", "array", "null"):
        if isinstance(value, JSON_TYPES[name]):
            return name
    return type(value).__name__

"""The environment contract (DESIGN.md): ``reset(task) -> observation`` and
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

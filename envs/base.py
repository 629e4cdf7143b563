"""The environment contract (DESIGN.md): ``reset(task) -> observation`` and
``step(action) -> (observation, reward, done, info)``.

Async so that many trajectories share one event loop while their sandboxes work.
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

"""Environment kinds by name, so the Toolbox's workers and ``envs.config`` never hard-code one.

Each kind registers, in the module that defines it, a factory that builds its ``envs.base.Env``
from a sandbox source and the pool's options, plus how its tasks travel (a JSON object in, the
task ``reset`` takes out) and its tool schemas (for quotas and metrics); optionally how a task is
read from a directory a user names (``env.tasks=[DIR, ...]``) and the tasks it ships with::

    from envs.registry import EnvOptions, SandboxFactory, register_env

    @register_env("toy_tool", load_task=ToyTask.from_dict, tools=TOOL_SCHEMAS)
    def make_toy_tool(sandbox: SandboxFactory, options: EnvOptions) -> ToyToolEnv:
        return ToyToolEnv(sandbox, max_turns=options.max_turns)

    env = make_env("toy_tool", backend.create, EnvOptions(max_turns=4))
    first_observation = await env.reset(load_task("toy_tool", {"question": ...}))

A kind shipped with mopd is listed in ``_BUILTIN_MODULES``: looking it up imports its module, which
registers it. A kind defined elsewhere registers itself when its module is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from envs.base import Env
    from envs.sandbox.base import Sandbox

SandboxFactory = Callable[[], "Awaitable[Sandbox]"]  # a fresh (or pre-warmed) sandbox per call

_BUILTIN_MODULES = {"swe": "envs.swe.env", "toy_tool": "envs.toy_tool"}


@dataclass(frozen=True)
class EnvOptions:
    """What a Toolbox pool tells every env it builds (``toolbox.toolbox.PoolSpec``)."""

    max_turns: int = 30
    command_timeout: float = 60.0  # seconds one tool call may run in the sandbox


class EnvFactory(Protocol):
    def __call__(self, sandbox: SandboxFactory, options: EnvOptions) -> Env: ...


def _as_dict(task: Any) -> dict[str, Any]:
    if not isinstance(task, dict):
        raise TypeError(f"expected a task as a JSON object (dict), got {type(task).__name__}")
    return task


@dataclass(frozen=True)
class EnvKind:
    name: str
    build: EnvFactory
    # a task's wire form (JSON object, as tasks travel to Ray workers) -> what ``Env.reset`` takes;
    # raises ValueError naming the field that is wrong
    load_task: Callable[[dict[str, Any]], Any]
    tools: dict[str, dict[str, Any]]  # tool name -> schema, as envs.tool_parsing checks them
    # the inverse of ``load_task`` (a task object -> its JSON object); identity for dict tasks
    dump_task: Callable[[Any], dict[str, Any]] = field(default=_as_dict)
    # a task from a path a user names (raises ValueError saying what is wrong); None: no task files
    read_task: Callable[[str], Any] | None = None
    builtin_tasks: Callable[[], list[Any]] | None = None  # the tasks shipped with the kind
    # what ``reset(task)`` answers, without a sandbox (a task's prompt row is this text); None: unknown
    first_observation: Callable[[Any, EnvOptions], str] | None = None


_KINDS: dict[str, EnvKind] = {}


def register_env(
    kind: str,
    *,
    load_task: Callable[[dict[str, Any]], Any],
    tools: Mapping[str, dict[str, Any]],
    dump_task: Callable[[Any], dict[str, Any]] = _as_dict,
    read_task: Callable[[str], Any] | None = None,
    builtin_tasks: Callable[[], list[Any]] | None = None,
    first_observation: Callable[[Any, EnvOptions], str] | None = None,
) -> Callable[[EnvFactory], EnvFactory]:
    """Decorator: register ``factory`` as the builder of env kind ``kind`` (one factory per kind)."""
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"env kind must be an identifier, got {kind!r}")

    def register(factory: EnvFactory) -> EnvFactory:
        old = _KINDS.get(kind)
        if old is not None and old.build is not factory:
            raise ValueError(f"env kind {kind!r} is already registered by {old.build!r}")
        _KINDS[kind] = EnvKind(kind, factory, load_task, dict(tools), dump_task, read_task, builtin_tasks,
                               first_observation)
        return factory

    return register


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES.values():
        importlib.import_module(module)


def env_kinds() -> tuple[str, ...]:
    """Every registered kind (the built-in ones included), sorted."""
    _import_builtins()
    return tuple(sorted(_KINDS))


def env_kind(kind: str) -> EnvKind:
    """The registration of ``kind``; ValueError naming the known kinds when there is none."""
    if kind not in _KINDS and kind in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[kind])
    if kind not in _KINDS:
        raise ValueError(f"unknown env kind {kind!r}; registered kinds: {env_kinds()}")
    return _KINDS[kind]


def make_env(kind: str, sandbox: SandboxFactory, options: EnvOptions | None = None) -> Env:
    """A fresh env of ``kind`` (not yet reset) drawing its sandboxes from ``sandbox``."""
    return env_kind(kind).build(sandbox, options or EnvOptions())


def load_task(kind: str, obj: dict[str, Any]) -> Any:
    """A task of ``kind`` from its JSON object (validated by the kind; errors name the field)."""
    return env_kind(kind).load_task(obj)


def kind_tasks(kind: str, paths: Sequence[str] = ()) -> list[Any]:
    """The tasks of ``kind`` read from ``paths``, or its built-in tasks when ``paths`` is empty."""
    spec = env_kind(kind)
    if paths:
        if spec.read_task is None:
            raise ValueError(f"env kind {kind!r} reads no task files")
        return [spec.read_task(p) for p in paths]
    if spec.builtin_tasks is None:
        raise ValueError(f"env kind {kind!r} ships no tasks; name task files")
    return spec.builtin_tasks()

"""Typed configuration of environments (single-turn verifiers, SWE-style code tasks) and sandboxes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from mopd.core.errors import ConfigError

SINGLE_TURN = "verifiable"  # rewarded by a domain verifier (mopd/rewards.py); every other kind is
# a multi-turn environment registered in envs/registry.py
SANDBOX_BACKENDS = ("local", "kubernetes")
ISOLATION_MODES = ("auto", "strict", "none")


MAX_CALL_TIMEOUT_S = 3600.0  # the sandbox agent's ceiling for one call (backends pass it as --max-timeout)


def check_episode_limits(max_turns: object, command_timeout: object, **positive_ints: object) -> None:
    """A tool environment's limits, checked when it is built: ValueError naming the bad one."""
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
    if (
        isinstance(command_timeout, bool)
        or not isinstance(command_timeout, (int, float))
        or not math.isfinite(command_timeout)
        or not 0 < command_timeout <= MAX_CALL_TIMEOUT_S
    ):
        raise ValueError(
            f"command_timeout must be a number of seconds in (0, {MAX_CALL_TIMEOUT_S:g}], got {command_timeout!r}"
        )
    for name, value in positive_ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class SandboxConfig:
    backend: str = "local"  # local process | kubernetes pod
    cpu_time_s: int = 60
    memory_mb: int = 1024
    wall_timeout_s: float = 120.0
    max_output_bytes: int = 65536
    max_procs: int = 64  # pids cgroup + RLIMIT_NPROC (per-sandbox uid)
    file_size_mb: int = 256  # RLIMIT_FSIZE
    # local: the work dir is a tmpfs of this size (all files together; also caps the file count);
    # what the sandbox writes there counts against its memory cgroup too
    disk_mb: int = 1024
    no_network: bool = True
    # local: auto = enforce every mechanism this host supports; strict = refuse to start without
    # uid switch, network cut, read-only filesystem, pids cgroup, PID and IPC namespaces and the
    # disk quota (envs.sandbox.local.STRICT); none = rlimits only
    isolation: str = "auto"
    base_dir: str = ""  # default: $TMPDIR/mopd-sandboxes
    # kubernetes
    namespace: str = "mopd-sandboxes"
    image: str = "python:3.11-slim"
    runtime_class: str | None = None
    warm_pool_size: int = 0
    cpu: str = "1"
    ephemeral_storage: str = "2Gi"
    agent_port: int = 8000
    ready_timeout_s: float = 120.0

    def validate(self, prefix: str = "sandbox") -> None:
        if self.backend not in SANDBOX_BACKENDS:
            raise ConfigError(f"{prefix}.backend", f"one of {SANDBOX_BACKENDS}", self.backend)
        if self.isolation not in ISOLATION_MODES:
            raise ConfigError(f"{prefix}.isolation", f"one of {ISOLATION_MODES}", self.isolation)
        for name in (
            "cpu_time_s",
            "memory_mb",
            "max_output_bytes",
            "max_procs",
            "file_size_mb",
            "disk_mb",
            "agent_port",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{prefix}.{name}", "an integer >= 1", value)
        for name in ("wall_timeout_s", "ready_timeout_s"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0 < value <= MAX_CALL_TIMEOUT_S
            ):
                raise ConfigError(
                    f"{prefix}.{name}", f"a number of seconds in (0, {MAX_CALL_TIMEOUT_S:g}]", value
                )
        if self.warm_pool_size < 0:
            raise ConfigError(f"{prefix}.warm_pool_size", "an integer >= 0", self.warm_pool_size)
        if self.agent_port > 65535:
            raise ConfigError(f"{prefix}.agent_port", "a TCP port in 1..65535", self.agent_port)
        for name in ("namespace", "image", "cpu", "ephemeral_storage"):
            if not getattr(self, name):
                raise ConfigError(f"{prefix}.{name}", "a non-empty string", getattr(self, name))


@dataclass
class EnvConfig:
    kind: str = SINGLE_TURN  # verifiable (single-turn) | a registered kind (swe: multi-turn code)
    # data domains whose prompts are episodes of `kind` (the `tool` agent loop, rollout/agent_loop.py);
    # every other domain stays single-turn, rewarded by its verifier. Empty: the domain named like the kind
    domains: list[str] = field(default_factory=list)
    max_turns: int = 1  # model turns per episode
    max_new_tokens: int = 0  # per model turn of an episode; 0 = rollout.max_new_tokens
    workers: int = 2  # Toolbox worker actors (each a pool of sandboxes) for `kind`
    # task directories (or task files) of a registered kind; empty: the kind's built-in tasks
    tasks: list[str] = field(default_factory=list)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def validate(self, prefix: str = "env") -> None:
        from envs.registry import env_kind, env_kinds  # the registry imports the kinds, which import this

        kinds = (SINGLE_TURN, *env_kinds())
        if self.kind not in kinds:
            raise ConfigError(f"{prefix}.kind", f"one of {kinds}", self.kind)
        if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise ConfigError(f"{prefix}.max_turns", "an integer >= 1", self.max_turns)
        if self.kind != SINGLE_TURN and self.max_turns < 2:
            raise ConfigError(f"{prefix}.max_turns", f"an integer >= 2 for the multi-turn kind {self.kind!r} "
                              "(a tool call and the answer to its observation)", self.max_turns)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError(f"{prefix}.max_new_tokens", "an integer >= 0 (0 = rollout.max_new_tokens)",
                              self.max_new_tokens)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"{prefix}.workers", "an integer >= 1", self.workers)
        if self.domains and self.kind == SINGLE_TURN:
            raise ConfigError(f"{prefix}.domains", f"empty for kind {SINGLE_TURN} (every domain is single-turn)",
                              self.domains)
        if any(not isinstance(d, str) or not d for d in self.domains):
            raise ConfigError(f"{prefix}.domains", "data domain names (non-empty strings)", self.domains)
        if self.tasks and self.kind == SINGLE_TURN:
            raise ConfigError(
                f"{prefix}.tasks",
                f"empty for kind {SINGLE_TURN} (its prompts come from the data config)",
                self.tasks,
            )
        for i, path in enumerate(self.tasks):
            read = env_kind(self.kind).read_task
            if read is None:
                raise ConfigError(
                    f"{prefix}.tasks", f"empty: env kind {self.kind!r} reads no task files", self.tasks
                )
            if not isinstance(path, str) or not os.path.exists(path):
                raise ConfigError(f"{prefix}.tasks[{i}]", "an existing task directory", path)
            try:
                read(path)
            except ValueError as exc:
                raise ConfigError(f"{prefix}.tasks[{i}]", f"a valid {self.kind} task ({exc})", path) from None
        self.sandbox.validate(f"{prefix}.sandbox")

    @property
    def episode_domains(self) -> set[str]:
        """The data domains played as multi-turn episodes of `kind`."""
        if self.kind == SINGLE_TURN:
            return set()
        return set(self.domains) or {self.kind}

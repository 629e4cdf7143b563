"""Typed configuration of environments (single-turn verifiers, SWE-style code tasks) and sandboxes."""

from __future__ import annotations

from dataclasses import dataclass, field

from mopd.types import ConfigError

ENV_KINDS = ("verifiable", "swe")
SANDBOX_BACKENDS = ("local", "kubernetes")


@dataclass
class SandboxConfig:
    backend: str = "local"  # local process | kubernetes pod
    cpu_time_s: int = 60
    memory_mb: int = 1024
    wall_timeout_s: float = 120.0
    max_output_bytes: int = 65536
    # kubernetes
    namespace: str = "mopd-sandboxes"
    image: str = "python:3.11-slim"
    runtime_class: str | None = None
    warm_pool_size: int = 0


@dataclass
class EnvConfig:
    kind: str = "verifiable"  # verifiable (single-turn, rewarded by a verifier) | swe (multi-turn code)
    max_turns: int = 1
    tasks: list[str] = field(default_factory=list)  # task files for kind=swe
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def validate(self, prefix: str = "env") -> None:
        if self.kind not in ENV_KINDS:
            raise ConfigError(f"{prefix}.kind", f"one of {ENV_KINDS}", self.kind)
        if self.max_turns < 1:
            raise ConfigError(f"{prefix}.max_turns", "an integer >= 1", self.max_turns)
        if self.sandbox.backend not in SANDBOX_BACKENDS:
            raise ConfigError(f"{prefix}.sandbox.backend", f"one of {SANDBOX_BACKENDS}", self.sandbox.backend)

"""Typed configuration of the rollout side (engines, sampling, prefix cache, R3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mopd.types import ConfigError

ENGINE_BACKENDS = ("local", "sglang", "remote")


@dataclass
class RolloutConfig:
    backend: str = "local"  # local (HF transformers server) | sglang | remote (existing URLs)
    num_engines: int = 1
    urls: list[str] = field(default_factory=list)  # backend=remote: servers already running
    cpus_per_engine: float = 1.0
    gpus_per_engine: int = 0  # also SGLang's --tp-size
    mem_fraction_static: float = 0.8
    max_batch_size: int = 16  # local server: requests batched into one forward
    max_context_len: int = 512
    # sampling
    n_samples_per_prompt: int = 4
    prompts_per_step: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    sample_from: str = "student"  # student (on-policy) | teacher (each prompt's domain teacher: off-policy SFT)
    # framework features
    prefix_cache: bool = True  # request-level prefix cache for multi-turn trajectories
    routing_replay: bool = True  # R3: capture routed experts at rollout, replay in training
    # client
    request_timeout_s: float = 300.0
    max_retries: int = 3
    startup_timeout_s: float = 300.0
    sglang_args: dict[str, Any] = field(default_factory=dict)  # extra --flags for sglang.launch_server

    def validate(self, prefix: str = "rollout") -> None:
        if self.backend not in ENGINE_BACKENDS:
            raise ConfigError(f"{prefix}.backend", f"one of {ENGINE_BACKENDS}", self.backend)
        if self.backend == "remote" and not self.urls:
            raise ConfigError(f"{prefix}.urls", "at least one server URL when backend=remote", self.urls)
        for name in ("num_engines", "n_samples_per_prompt", "prompts_per_step", "max_new_tokens",
                     "max_batch_size", "max_context_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", "an integer >= 1", getattr(self, name))
        if self.sample_from not in ("student", "teacher"):
            raise ConfigError(f"{prefix}.sample_from", "one of student, teacher", self.sample_from)
        if self.temperature < 0:
            raise ConfigError(f"{prefix}.temperature", "a number >= 0", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p", "a number in (0, 1]", self.top_p)
        if self.max_new_tokens >= self.max_context_len:
            raise ConfigError(f"{prefix}.max_new_tokens", f"fewer than max_context_len={self.max_context_len}",
                              self.max_new_tokens)

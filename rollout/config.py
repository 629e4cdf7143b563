"""Typed configuration of the rollout side: how an engine is served, how it is sampled from, and the
framework features on top. A teacher reuses `EngineConfig` (mopd/teachers.py: TeacherConfig)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mopd.core.errors import ConfigError

ENGINE_BACKENDS = ("local", "sglang", "remote")


@dataclass
class EngineConfig:
    """The servers of one model: what rollout/engines.py `launch_engines` starts (or, remote, attaches to)."""

    backend: str = "local"  # local (HF transformers server) | sglang | remote (existing URLs)
    num_engines: int = 1
    urls: list[str] = field(default_factory=list)  # backend=remote: servers already running
    cpus_per_engine: float = 1.0
    gpus_per_engine: int = 0  # also SGLang's --tp-size
    mem_fraction_static: float = 0.8
    max_batch_size: int = 16  # local server: requests batched into one forward
    max_context_len: int = 512
    sglang_args: dict[str, Any] = field(default_factory=dict)  # extra --flags for sglang.launch_server
    # client: each request may take request_timeout_s; a failed one is re-sent at most max_retries times
    # within startup_timeout_s (long enough for a dead engine to be restarted by its actor)
    request_timeout_s: float = 300.0
    max_retries: int = 3
    startup_timeout_s: float = 300.0

    def validate(self, prefix: str, backends: tuple[str, ...] = ENGINE_BACKENDS) -> None:
        """Range checks at start-up: a bad value fails before Ray and the engines start."""
        if self.backend not in backends:
            raise ConfigError(f"{prefix}.backend", f"one of {backends}", self.backend)
        if self.backend == "remote" and not self.urls:
            raise ConfigError(f"{prefix}.urls", "at least one server URL when backend=remote", self.urls)
        for name in ("num_engines", "max_batch_size", "max_context_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", "an integer >= 1", getattr(self, name))
        for name in ("cpus_per_engine", "mem_fraction_static", "request_timeout_s", "startup_timeout_s"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{prefix}.{name}", "a finite number", getattr(self, name))
        if self.cpus_per_engine <= 0:
            raise ConfigError(f"{prefix}.cpus_per_engine", "a number > 0", self.cpus_per_engine)
        if self.gpus_per_engine < 0:
            raise ConfigError(f"{prefix}.gpus_per_engine", "an integer >= 0", self.gpus_per_engine)
        if not 0 < self.mem_fraction_static <= 1:
            raise ConfigError(f"{prefix}.mem_fraction_static", "a number in (0, 1]", self.mem_fraction_static)
        for name in ("request_timeout_s", "startup_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}", "a number of seconds > 0", getattr(self, name))
        if self.max_retries < 0:
            raise ConfigError(f"{prefix}.max_retries", "an integer >= 0", self.max_retries)
        if any(not url.startswith(("http://", "https://")) for url in self.urls):
            raise ConfigError(f"{prefix}.urls", "server URLs (http://host:port)", self.urls)


@dataclass
class SamplingConfig:
    """How each step's responses are sampled: what the rollout manager asks the engines for."""

    n_samples_per_prompt: int = 4
    prompts_per_step: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    sample_from: str = "student"  # student (on-policy) | teacher (each prompt's domain teacher: off-policy SFT)

    def validate(self, prefix: str) -> None:
        for name in ("n_samples_per_prompt", "prompts_per_step", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", "an integer >= 1", getattr(self, name))
        if self.sample_from not in ("student", "teacher"):
            raise ConfigError(f"{prefix}.sample_from", "one of student, teacher", self.sample_from)
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{prefix}.{name}", "a finite number", getattr(self, name))
        if self.temperature < 0:
            raise ConfigError(f"{prefix}.temperature", "a number >= 0 (0 = greedy)", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p", "a number in (0, 1]", self.top_p)
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"{prefix}.top_k", "-1 (no top-k) or an integer >= 1", self.top_k)


@dataclass
class RolloutConfig(EngineConfig, SamplingConfig):
    """The student's engines and sampling (the user-facing keys stay flat: `rollout.num_engines`,
    `rollout.temperature`), plus the framework features."""

    prefix_cache: bool = True  # request-level prefix cache for multi-turn trajectories
    routing_replay: bool = True  # R3: capture routed experts at rollout, replay in training
    # MTP self-speculative decoding: K draft tokens per verify from the model's MTP layers (0 = off);
    # SGLang's --speculative-num-steps (engines get rollout.speculative.engine_args)
    speculative_num_steps: int = 0
    # how generation is scheduled: batch (each step's prompts generated together, the step waits for its
    # slowest sample) | sequence (rollout/scheduler.py: sequences kept in flight per engine, partial rollout)
    scheduler: str = "batch"
    in_flight_per_engine: int = 0  # sequence: sequences in flight per engine (0 = a step's samples / engines)
    partial_rollout: bool = False  # sequence: sequences cut by a step end continue later from their prefix
    max_staleness: int = 1  # sequence: oldest weight version a trained token may have, in versions behind
    stale_policy: str = "drop"  # sequence: a group past max_staleness is dropped | regenerated from scratch

    @classmethod
    def combine(cls, engine: EngineConfig, sampling: SamplingConfig, **features: Any) -> RolloutConfig:
        """A rollout of `sampling` on the servers of `engine` (e.g. a teacher generating, sample_from=teacher)."""
        def values(cfg: Any, part: type) -> dict[str, Any]:
            return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(part)}

        return cls(**values(engine, EngineConfig), **values(sampling, SamplingConfig), **features)

    def validate(self, prefix: str = "rollout", backends: tuple[str, ...] = ENGINE_BACKENDS) -> None:
        EngineConfig.validate(self, prefix, backends)
        SamplingConfig.validate(self, prefix)
        if not isinstance(self.speculative_num_steps, int) or not 0 <= self.speculative_num_steps <= 8:
            raise ConfigError(f"{prefix}.speculative_num_steps", "an integer in [0, 8] (0 = no speculative decoding; "
                              "at most the model's MTP layers)", self.speculative_num_steps)
        self._validate_scheduler(prefix)
        if self.max_new_tokens >= self.max_context_len:
            raise ConfigError(f"{prefix}.max_new_tokens", f"fewer than max_context_len={self.max_context_len}",
                              self.max_new_tokens)

    def _validate_scheduler(self, prefix: str) -> None:
        if self.scheduler not in ("batch", "sequence"):
            raise ConfigError(f"{prefix}.scheduler", "one of batch, sequence", self.scheduler)
        if self.stale_policy not in ("drop", "regenerate"):
            raise ConfigError(f"{prefix}.stale_policy", "one of drop, regenerate", self.stale_policy)
        for name in ("in_flight_per_engine", "max_staleness"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{prefix}.{name}", "an integer >= 0", value)
        if not isinstance(self.partial_rollout, bool):
            raise ConfigError(f"{prefix}.partial_rollout", "true or false", self.partial_rollout)

    def in_flight_target(self, num_engines: int) -> int:
        """Sequences the sequence scheduler keeps in flight over `num_engines` engines."""
        per_engine = self.in_flight_per_engine or math.ceil(
            self.prompts_per_step * self.n_samples_per_prompt / max(num_engines, 1))
        return per_engine * max(num_engines, 1)

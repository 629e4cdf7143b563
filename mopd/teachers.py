"""Domain teachers: their config, registration, routing of prompts to teachers, vocabulary checks, scoring.

A teacher scores `prompt + response` and returns log pi_teacher of every response token. Built-in
backends serve the teacher checkpoint on rollout engines (the local HF server or SGLang) or use
servers that already run (`remote`); all of them are spoken to over SGLang's native API. Users add
other kinds (an API model, a reward server) with `register_teacher_backend`:

    from mopd.teachers import Teacher, TeacherConfig, register_teacher_backend

    @register_teacher_backend("my_kind")
    def make(name: str, cfg: TeacherConfig) -> Teacher:
        return MyTeacher(...)   # any object with `async score(samples, top_k)` and `close()`
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from omegaconf import MISSING
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mopd.core.algo import sharpen_teacher_scores
from mopd.core.errors import ConfigError
from mopd.core.types import Sample, TokenScores
from rollout.config import EngineConfig, RolloutConfig, SamplingConfig
from rollout.rollout_manager import RolloutManager
from rollout.teacher_scoring import score_samples


@dataclass
class TeacherConfig(EngineConfig):
    """A domain teacher: its model, the domains it scores, its coefficient, and the engines that serve it
    (`teachers.NAME.num_engines`, `.cpus_per_engine`, `.request_timeout_s`...). Its name is its key under
    `teachers`."""

    model_path: str = MISSING
    domains: list[str] = field(default_factory=list)  # prompts of these domains are scored by it
    coef: float = 1.0  # scale of this teacher's dense reward

    def validate(self, prefix: str, backends: tuple[str, ...] = ()) -> None:
        """Range checks at start-up; `backends` defaults to the kinds registered with register_teacher_backend."""
        backends = backends or tuple(sorted(_BACKENDS))
        if self.backend not in backends:
            raise ConfigError(f"{prefix}.backend", f"one of {sorted(backends)}", self.backend)
        super().validate(prefix, backends)
        if any(not domain for domain in self.domains):
            raise ConfigError(f"{prefix}.domains", "non-empty domain names", self.domains)
        if self.backend != "remote" and not self.model_path:
            raise ConfigError(f"{prefix}.model_path", "a model checkpoint directory", self.model_path)
        if self.coef < 0:
            raise ConfigError(f"{prefix}.coef", "a number >= 0", self.coef)


class Teacher(Protocol):
    async def score(self, samples: list[Sample], top_k: int) -> list[TokenScores]:
        """log pi_teacher(y_t | x, y_<t) for every response token of every sample; with top_k > 0 also the
        teacher's k most likely tokens and their logprobs at each response position (top_k = 0: none)."""

    def close(self) -> None: ...


TeacherFactory = Callable[[str, TeacherConfig], Teacher]
_BACKENDS: dict[str, TeacherFactory] = {}


def register_teacher_backend(kind: str) -> Callable[[TeacherFactory], TeacherFactory]:
    """Make `teachers.NAME.backend=kind` build teachers with the decorated factory."""

    def decorator(factory: TeacherFactory) -> TeacherFactory:
        _BACKENDS[kind] = factory
        return factory

    return decorator


def known_backends() -> set[str]:
    return set(_BACKENDS)


class EngineTeacher:
    """A teacher served by SGLang-protocol engines; scoring is a prefill with prompt logprobs.

    Scoring honours teachers.NAME.request_timeout_s (per prefill), .max_retries and, while a dead engine
    is restarted by its actor, .startup_timeout_s; then it fails with the engine URLs.
    """

    def __init__(self, name: str, cfg: EngineConfig, urls: list[str], *, model_path: str | None = None,
                 engines: Any = None) -> None:
        self.name = name
        self.cfg = cfg
        self.urls = list(urls)
        self.model_path = model_path
        self.engines = engines  # rollout.engines.EngineGroup (None for remote servers)
        self._manager: RolloutManager | None = None  # made on the first generate
        self._alive_checked = -math.inf  # monotonic time of the last ensure_alive

    async def score(self, samples: list[Sample], top_k: int) -> list[TokenScores]:
        # An engine that died between steps is back first. The check is a Ray call to every engine actor,
        # and the sequence scheduler scores group by group, so it runs at most once a second: a server that
        # dies in between is restarted by its actor's watcher, and the dispatcher waits for it meanwhile.
        if self.engines is not None and time.monotonic() - self._alive_checked > 1.0:
            self.urls = await asyncio.to_thread(self.engines.ensure_alive)
            self._alive_checked = time.monotonic()
        cfg = self.cfg
        return await score_samples(self.urls, samples, top_k=top_k, timeout_s=cfg.request_timeout_s,
                                   max_retries=cfg.max_retries, retry_window_s=cfg.startup_timeout_s)

    async def generate(self, samples: list[Sample], sampling: SamplingConfig,
                       tokenizer: PreTrainedTokenizerBase | None) -> list[Sample]:
        """Sample responses from the teacher itself (off-policy data for SFT baselines); one rollout manager
        per teacher, made on the first call (the job's sampling settings do not change between steps)."""
        if self._manager is None:
            cfg = RolloutConfig.combine(self.cfg, sampling, routing_replay=False)
            self._manager = RolloutManager(self.urls, cfg, tokenizer=tokenizer, model_path=self.model_path,
                                           eos_token_id=tokenizer.eos_token_id if tokenizer else None,
                                           engines=self.engines)
        return await self._manager.generate(samples)

    def close(self) -> None:
        if self.engines is not None:
            self.engines.shutdown()


def _engine_teacher(name: str, cfg: TeacherConfig) -> Teacher:
    from rollout.engines import launch_engines  # imports Ray, which job._init_ray configures first

    group = launch_engines(cfg.model_path, cfg, name=f"teacher-{name}", routing_replay=False)
    return EngineTeacher(name, cfg, list(group.urls), model_path=cfg.model_path or None,
                         engines=group if group.actors else None)


for _kind in ("local", "sglang", "remote"):
    register_teacher_backend(_kind)(_engine_teacher)


@dataclass
class TeacherRouter:
    """Maps a prompt's domain to the name of the teacher that scores it."""

    domain_to_teacher: dict[str, str]
    default_teacher: str | None = None

    @classmethod
    def from_config(cls, teachers: dict[str, TeacherConfig], default_teacher: str | None = None) -> TeacherRouter:
        mapping = {d: name for name, t in teachers.items() for d in t.domains}
        return cls(mapping, default_teacher)

    def teacher_for(self, domain: str) -> str:
        teacher = self.domain_to_teacher.get(domain, self.default_teacher)
        if teacher is None:
            raise ConfigError("teachers", f"a teacher whose domains include {domain!r} or a default_teacher "
                              f"(covered: {sorted(self.domain_to_teacher)})", domain)
        return teacher

    def check_domains(self, domains: set[str]) -> None:
        """Fail at start-up if the data holds a domain that no teacher covers."""
        uncovered = sorted(d for d in domains if d not in self.domain_to_teacher)
        if uncovered and self.default_teacher is None:
            raise ConfigError("teachers", f"a teacher for every domain in the data; no teacher covers {uncovered} "
                              f"(add it to a teacher's domains or set default_teacher)", uncovered)


def check_same_vocabulary(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
                          teacher_name: str, max_listed: int = 10) -> None:
    """Token-level rewards compare logprobs of the same token ids, so the vocabularies must agree."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab == t_vocab:
        return
    only_student = sorted(set(s_vocab) - set(t_vocab))
    only_teacher = sorted(set(t_vocab) - set(s_vocab))
    different_ids = sorted(tok for tok in set(s_vocab) & set(t_vocab) if s_vocab[tok] != t_vocab[tok])
    parts = []
    if only_student:
        parts.append(f"{len(only_student)} token(s) only in the student, e.g. {only_student[:max_listed]}")
    if only_teacher:
        parts.append(f"{len(only_teacher)} token(s) only in the teacher, e.g. {only_teacher[:max_listed]}")
    if different_ids:
        examples = [(t, s_vocab[t], t_vocab[t]) for t in different_ids[:max_listed]]
        parts.append(f"{len(different_ids)} token(s) with different ids (token, student id, teacher id), "
                     f"e.g. {examples}")
    raise ConfigError(f"teachers.{teacher_name}.model_path",
                      "a teacher with the student's vocabulary; " + "; ".join(parts))


def _generator(name: str, teacher: Teacher) -> EngineTeacher:
    """The teacher as one that can sample (rollout.sample_from=teacher): only engine-served teachers can."""
    if not isinstance(teacher, EngineTeacher):
        raise ConfigError(f"teachers.{name}.backend", "a teacher that can generate (local, sglang or remote) "
                          "when rollout.sample_from=teacher", type(teacher).__name__)
    return teacher


def check_teacher_vocabularies(teachers: dict[str, TeacherConfig], student_tokenizer: PreTrainedTokenizerBase) -> None:
    for name, teacher in teachers.items():
        if teacher.model_path:
            check_same_vocabulary(student_tokenizer, AutoTokenizer.from_pretrained(teacher.model_path), name)


class TeacherSet:
    """All teachers of a job; sends each sample to its domain's teacher, every teacher at once."""

    def __init__(self, teachers: dict[str, Teacher], router: TeacherRouter, coefs: dict[str, float] | None = None,
                 sampling: SamplingConfig | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 temperature: float = 1.0, temperature_support: int = 20) -> None:
        self.teachers = teachers
        self.router = router
        self.coefs = dict(coefs or {})  # teachers.NAME.coef: scales that teacher's dense term in the loss
        self.sampling = sampling or SamplingConfig()  # rollout.* sampling, for sample_from=teacher
        self.tokenizer = tokenizer
        # algo.teacher_temperature(_support): every teacher scores as pi^(1/temperature) / Z (sharpen_teacher_scores)
        self.temperature = temperature
        self.temperature_support = temperature_support

    @classmethod
    def launch(cls, configs: dict[str, TeacherConfig], default_teacher: str | None = None, *,
               sampling: SamplingConfig | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
               temperature: float = 1.0, temperature_support: int = 20) -> TeacherSet:
        """Start every teacher (a failure closes those already started); with sampling.sample_from=teacher
        each must be able to generate."""
        teachers: dict[str, Teacher] = {}
        try:
            for name, cfg in configs.items():
                teachers[name] = _BACKENDS[cfg.backend](name, cfg)
                if sampling is not None and sampling.sample_from == "teacher":
                    _generator(name, teachers[name])
        except BaseException:
            for teacher in teachers.values():
                teacher.close()
            raise
        return cls(teachers, TeacherRouter.from_config(configs, default_teacher),
                   coefs={name: cfg.coef for name, cfg in configs.items()}, sampling=sampling, tokenizer=tokenizer,
                   temperature=temperature, temperature_support=temperature_support)

    def _by_teacher(self, samples: list[Sample]) -> dict[str, list[Sample]]:
        """Set `sample.teacher` (its domain's teacher) and group the samples by it."""
        groups: dict[str, list[Sample]] = defaultdict(list)
        for sample in samples:
            sample.teacher = self.router.teacher_for(sample.domain)
            groups[sample.teacher].append(sample)
        return groups

    async def score(self, samples: list[Sample], top_k: int = 0) -> None:
        """Fill `sample.teacher` and `sample.teacher_logprobs` (and, with top_k > 0, the teacher's top-k tokens
        and their logprobs at each response position) for every sample, all teachers concurrently;
        `sample.metadata["teacher_coef"]` is that teacher's teachers.NAME.coef, the trainer's multiplier of its
        dense term. With a temperature below 1 each teacher is asked for max(top_k, temperature_support) top tokens,
        the normaliser of its sharpened distribution, and its scores are those of the sharpened teacher."""
        groups = self._by_teacher(samples)
        names = list(groups)
        sharpen = self.temperature != 1.0
        asked = max(top_k, self.temperature_support) if sharpen else top_k
        results = await asyncio.gather(*(self.teachers[name].score(groups[name], asked) for name in names))
        for name, scores in zip(names, results):
            if len(scores) != len(groups[name]):
                raise RuntimeError(f"teacher {name!r} returned {len(scores)} scores for {len(groups[name])} samples")
            for sample, got in zip(groups[name], scores):
                if len(got.logprobs) != len(sample.response_ids):
                    raise RuntimeError(f"teacher {name!r} returned {len(got.logprobs)} logprobs for a response of "
                                       f"{len(sample.response_ids)} tokens")
                if sharpen:
                    try:
                        got = sharpen_teacher_scores(got, self.temperature, keep_top_k=top_k)
                    except ValueError as e:
                        raise RuntimeError(f"teacher {name!r}: {e}") from None
                sample.teacher_logprobs = list(got.logprobs)
                sample.metadata["teacher_coef"] = float(self.coefs.get(name, 1.0))
                sample.teacher_top_ids, sample.teacher_top_logprobs = got.top_ids, got.top_logprobs

    async def generate(self, samples: list[Sample]) -> list[Sample]:
        """Generate every sample with its domain's teacher (rollout.sample_from=teacher), all teachers at once."""
        groups = self._by_teacher(samples)
        await asyncio.gather(*(_generator(name, self.teachers[name]).generate(group, self.sampling, self.tokenizer)
                               for name, group in groups.items()))
        return samples

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()

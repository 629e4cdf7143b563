"""Domain teachers: registration, routing of prompts to teachers, vocabulary checks, scoring.

A teacher scores `prompt + response` and returns log pi_teacher of every response token. Built-in
backends serve the teacher checkpoint on rollout engines (the local HF server or SGLang) or use
servers that already run (`remote`); all of them are spoken to over SGLang's native API. Users add
other kinds (an API model, a reward server) with `register_teacher_backend`:

    from mopd.teachers import Teacher, register_teacher_backend

    @register_teacher_backend("my_kind")
    def make(name: str, cfg: TeacherConfig, rollout: RolloutConfig) -> Teacher:
        return MyTeacher(...)   # any object with .score(samples) and .close()
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mopd.config import JobConfig, TeacherConfig
from mopd.core.errors import ConfigError
from mopd.core.types import Sample, TokenScores
from rollout.config import RolloutConfig


class Teacher(Protocol):
    def score(self, samples: list[Sample]) -> list[list[float]]:
        """log pi_teacher(y_t | x, y_<t) for every response token of every sample."""

    def close(self) -> None: ...


class TopKTeacher(Teacher, Protocol):
    """A teacher that can also give its k most likely tokens at each response position (algo.teacher_top_k)."""

    def score_top_k(self, samples: list[Sample], top_k: int) -> list[TokenScores]: ...


TeacherFactory = Callable[[str, TeacherConfig, RolloutConfig], Teacher]
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

    Scoring honours rollout.request_timeout_s (per prefill), rollout.max_retries and, while a dead replica
    is restarted by its engine actor, rollout.startup_timeout_s; then it fails with the replica URLs.
    """

    def __init__(self, name: str, urls: list[str], shutdown: Callable[[], None] | None = None,
                 model_path: str | None = None, rollout: RolloutConfig | None = None,
                 engines: Any = None) -> None:
        self.name = name
        self.urls = urls
        self.model_path = model_path
        self.rollout = rollout or RolloutConfig()
        self.engines = engines  # rollout.engines.EngineGroup (None for remote servers)
        self._shutdown = shutdown

    async def generate(self, samples: list[Sample], rollout: RolloutConfig,
                       tokenizer: PreTrainedTokenizerBase | None) -> list[Sample]:
        """Sample responses from the teacher itself (off-policy data for SFT baselines)."""
        from dataclasses import replace

        from rollout.rollout_manager import RolloutManager

        manager = RolloutManager(self.urls, replace(rollout, routing_replay=False),
                                 eos_token_id=tokenizer.eos_token_id if tokenizer else None, tokenizer=tokenizer,
                                 model_path=self.model_path)
        return await manager.generate(samples)

    def score(self, samples: list[Sample]) -> list[list[float]]:
        return [s.logprobs for s in self.score_top_k(samples, 0)]

    def score_top_k(self, samples: list[Sample], top_k: int) -> list[TokenScores]:
        from rollout.teacher_scoring import score_samples

        if self.engines is not None:
            self.urls = self.engines.ensure_alive()  # a replica that died between steps is back first
        cfg = self.rollout
        return asyncio.run(score_samples(self.urls, samples, top_k=top_k, timeout_s=cfg.request_timeout_s,
                                         max_retries=cfg.max_retries, retry_window_s=cfg.startup_timeout_s))

    def close(self) -> None:
        if self._shutdown is not None:
            self._shutdown()


def _engine_teacher(name: str, cfg: TeacherConfig, rollout: RolloutConfig) -> Teacher:
    from dataclasses import replace

    from rollout.engines import launch_engines

    engine_cfg = replace(rollout, backend=cfg.backend, num_engines=cfg.replicas, urls=list(cfg.urls),
                         cpus_per_engine=cfg.cpus_per_replica, gpus_per_engine=cfg.gpus_per_replica,
                         sglang_args=dict(cfg.sglang_args))
    group = launch_engines(cfg.model_path, engine_cfg, name=f"teacher-{name}", routing_replay=False)
    return EngineTeacher(name, list(group.urls), group.shutdown, model_path=cfg.model_path or None,
                         rollout=engine_cfg, engines=group if group.actors else None)


for _kind in ("local", "sglang", "remote"):
    register_teacher_backend(_kind)(_engine_teacher)


@dataclass
class TeacherRouter:
    """Maps a prompt's domain to the name of the teacher that scores it."""

    domain_to_teacher: dict[str, str]
    default_teacher: str | None = None

    @classmethod
    def from_config(cls, job: JobConfig) -> TeacherRouter:
        mapping = {d: name for name, t in job.teachers.items() for d in t.domains}
        return cls(mapping, job.default_teacher)

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


def check_teacher_vocabularies(job: JobConfig, student_tokenizer: PreTrainedTokenizerBase) -> None:
    for name, teacher in job.teachers.items():
        if teacher.model_path:
            check_same_vocabulary(student_tokenizer, AutoTokenizer.from_pretrained(teacher.model_path), name)


class TeacherSet:
    """All teachers of a job; scores a batch by sending each sample to its domain's teacher."""

    def __init__(self, teachers: dict[str, Teacher], router: TeacherRouter, rollout: RolloutConfig | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, coefs: dict[str, float] | None = None) -> None:
        self.teachers = teachers
        self.router = router
        self.coefs = dict(coefs or {})  # teachers.NAME.coef: scales that teacher's dense term in the loss
        self.rollout = rollout or RolloutConfig()
        self.tokenizer = tokenizer

    @classmethod
    def launch(cls, job: JobConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> TeacherSet:
        teachers: dict[str, Teacher] = {}
        try:
            for name, cfg in job.teachers.items():
                teachers[name] = _BACKENDS[cfg.backend](name, cfg, job.rollout)
                if job.algo.teacher_top_k > 0 and not hasattr(teachers[name], "score_top_k"):
                    raise ConfigError("algo.teacher_top_k", f"0, or teachers whose backend gives top-k logprobs "
                                      f"(teacher {name!r}, backend {cfg.backend!r}, has no score_top_k)",
                                      job.algo.teacher_top_k)
        except BaseException:
            for teacher in teachers.values():
                teacher.close()
            raise
        return cls(teachers, TeacherRouter.from_config(job), job.rollout, tokenizer,
                   coefs={name: cfg.coef for name, cfg in job.teachers.items()})

    def score(self, samples: list[Sample], top_k: int = 0) -> None:
        """Fill `sample.teacher` and `sample.teacher_logprobs` (and, with top_k > 0, the teacher's top-k tokens
        and their logprobs at each response position) for every sample; `sample.metadata["teacher_coef"]` is
        that teacher's teachers.NAME.coef, the trainer's multiplier of its dense term."""
        by_teacher: dict[str, list[Sample]] = defaultdict(list)
        for sample in samples:
            sample.teacher = self.router.teacher_for(sample.domain)
            by_teacher[sample.teacher].append(sample)
        for name, group in by_teacher.items():
            teacher = self.teachers[name]
            if top_k > 0:
                scores = cast(TopKTeacher, teacher).score_top_k(group, top_k)  # checked at start-up
            else:
                scores = [TokenScores(logprobs=list(lp)) for lp in teacher.score(group)]
            for sample, got in zip(group, scores):
                if len(got.logprobs) != len(sample.response_ids):
                    raise RuntimeError(f"teacher {name!r} returned {len(got.logprobs)} logprobs for a response of "
                                       f"{len(sample.response_ids)} tokens")
                sample.teacher_logprobs = list(got.logprobs)
                sample.metadata["teacher_coef"] = float(self.coefs.get(name, 1.0))
                sample.teacher_top_ids, sample.teacher_top_logprobs = got.top_ids, got.top_logprobs

    async def generate(self, samples: list[Sample]) -> list[Sample]:
        """Generate every sample with its domain's teacher (rollout.sample_from=teacher)."""
        by_teacher: dict[str, list[Sample]] = defaultdict(list)
        for sample in samples:
            sample.teacher = self.router.teacher_for(sample.domain)
            by_teacher[sample.teacher].append(sample)
        jobs = []
        for name, group in by_teacher.items():
            teacher = self.teachers[name]
            if not hasattr(teacher, "generate"):
                raise ConfigError(f"teachers.{name}.backend", "a teacher that can generate (local, sglang or "
                                  "remote) when rollout.sample_from=teacher", type(teacher).__name__)
            jobs.append(teacher.generate(group, self.rollout, self.tokenizer))
        await asyncio.gather(*jobs)
        return samples

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()

"""The job's typed configuration: one dataclass tree registered with Hydra's ConfigStore.

Each package owns the dataclass of its own section (rollout/, trainer/, envs/); this module
composes them, registers the schema, and validates the whole job at start-up so that a bad
value fails before Ray, engines or the trainer start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from envs.config import EnvConfig
from mopd.advantages import AdvantageConfig
from mopd.types import ConfigError
from rollout.config import RolloutConfig
from trainer.config import TrainerConfig

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class StudentConfig:
    model_path: str = MISSING  # HF checkpoint directory (config.json, safetensors, tokenizer)
    tokenizer_path: str | None = None  # defaults to model_path


@dataclass
class TeacherConfig:
    """A domain teacher. Its name is its key under `teachers`."""

    model_path: str = MISSING
    domains: list[str] = field(default_factory=list)  # prompts of these domains are scored by it
    backend: str = "local"  # local | sglang | remote | any kind registered with mopd.teachers
    replicas: int = 1
    urls: list[str] = field(default_factory=list)  # backend=remote
    coef: float = 1.0  # scale of this teacher's dense reward
    cpus_per_replica: float = 1.0
    gpus_per_replica: int = 0
    sglang_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    train_files: list[str] = MISSING  # JSONL rows: {prompt: str | chat messages, domain, label}
    prompt_key: str = "prompt"
    domain_key: str = "domain"
    label_key: str = "label"
    shuffle: bool = True
    seed: int = 0
    # per-domain share of each step's prompts (sampling weights); empty = as the data comes
    domain_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "mopd"
    entity: str | None = None
    run_name: str | None = None
    progress: bool = True  # rich progress display on the terminal


@dataclass
class ToyConfig:
    """When `dir` is set, the toy world (tokenizer, student, teachers, data) is created there on first use."""

    dir: str | None = None
    domains: list[str] = field(default_factory=lambda: ["arith", "reverse"])
    base_steps: int = 0  # mixed-domain SFT of the base student first (0 = a random base)
    teacher_steps: int = 300
    teacher_lr: float = 3e-3
    arch: str = "qwen3_moe"
    hidden_size: int = 64
    num_layers: int = 2


@dataclass
class JobConfig:
    run_dir: str = "${hydra:runtime.output_dir}"
    num_steps: int = 20
    resume: bool = False
    seed: int = 0
    save_interval: int = 10  # checkpoint every N steps (and at the end); 0 = only at the end
    max_sampled_tokens: int = 0  # stop once this many response tokens were sampled; 0 = no budget
    dump_samples: bool = False  # write run_dir/samples/step_N.jsonl (prompt, response, reward, teacher KL)
    default_teacher: str | None = None  # scores prompts whose domain no teacher lists
    ray_address: str | None = None  # None = start an embedded Ray cluster
    ray_num_cpus: int | None = None  # embedded cluster only; None = what the job needs
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algo: AdvantageConfig = field(default_factory=AdvantageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)


def register_configs() -> None:
    """Register the job schema; it types every group's YAML merged into it (unknown keys are errors)."""
    ConfigStore.instance().store(name="mopd_schema", node=JobConfig)


def to_job_config(cfg: DictConfig | JobConfig) -> JobConfig:
    """Resolve interpolations, type-check, and validate a Hydra config into a JobConfig."""
    if isinstance(cfg, JobConfig):
        job = cfg
    else:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
        try:
            job = OmegaConf.to_object(merged)
        except MissingMandatoryValue as e:
            raise ConfigError(e.full_key, "a value (this field is required and has no default)") from None
    validate_static(job)
    return job


def validate_static(job: JobConfig) -> None:
    """Checks that need nothing but the config itself (no files, no data)."""
    if job.num_steps < 1:
        raise ConfigError("num_steps", "an integer >= 1", job.num_steps)
    if job.save_interval < 0:
        raise ConfigError("save_interval", "an integer >= 0", job.save_interval)
    if job.logger.wandb_mode not in WANDB_MODES:
        raise ConfigError("logger.wandb_mode", f"one of {WANDB_MODES}", job.logger.wandb_mode)
    if job.max_sampled_tokens < 0:
        raise ConfigError("max_sampled_tokens", "an integer >= 0 (0 = no budget)", job.max_sampled_tokens)
    if job.rollout.sample_from == "teacher" and job.trainer.loss != "sft":
        raise ConfigError("rollout.sample_from", "student unless trainer.loss=sft (teacher samples are "
                          "off-policy: the importance mask of mopd/grpo would discard them)", "teacher")
    if job.rollout.sample_from == "teacher" and not job.teachers:
        raise ConfigError("teachers", "at least one teacher when rollout.sample_from=teacher", {})
    job.rollout.validate("rollout")
    job.trainer.validate("trainer")
    job.algo.validate("algo")
    job.env.validate("env")
    _validate_teachers(job)


def _validate_teachers(job: JobConfig) -> None:
    from mopd.teachers import known_backends  # late import: teachers imports this module

    uses_teachers = job.trainer.loss == "mopd" and job.algo.teacher_coef > 0
    if uses_teachers and not job.teachers:
        raise ConfigError("teachers", "at least one teacher when trainer.loss=mopd "
                          "(add one with +teacher@teachers.NAME=FILE)", {})
    owner: dict[str, str] = {}
    for name, teacher in job.teachers.items():
        where = f"teachers.{name}"
        if teacher.backend not in known_backends():
            raise ConfigError(f"{where}.backend", f"one of {sorted(known_backends())}", teacher.backend)
        if teacher.backend == "remote" and not teacher.urls:
            raise ConfigError(f"{where}.urls", "at least one server URL when backend=remote", teacher.urls)
        if teacher.backend != "remote" and not teacher.model_path:
            raise ConfigError(f"{where}.model_path", "a model checkpoint directory", teacher.model_path)
        if teacher.replicas < 1:
            raise ConfigError(f"{where}.replicas", "an integer >= 1", teacher.replicas)
        if teacher.coef < 0:
            raise ConfigError(f"{where}.coef", "a number >= 0", teacher.coef)
        if not teacher.domains and name != job.default_teacher:
            raise ConfigError(f"{where}.domains", "a non-empty list of domains (or make it default_teacher)",
                              teacher.domains)
        for domain in teacher.domains:
            if domain in owner:
                raise ConfigError(f"{where}.domains", f"domains not already covered; {domain!r} belongs to "
                                  f"teacher {owner[domain]!r}", teacher.domains)
            owner[domain] = name
    if job.default_teacher is not None and job.default_teacher not in job.teachers:
        raise ConfigError("default_teacher", f"the name of a configured teacher {sorted(job.teachers)}",
                          job.default_teacher)

"""The job's typed configuration: one dataclass tree registered with Hydra's ConfigStore.

Each package owns the dataclass of its own section (rollout/, trainer/, envs/); this module
composes them, registers the schema, and validates the whole job at start-up so that a bad
value fails before Ray, engines or the trainer start.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from envs.config import EnvConfig
from envs.toy_tasks import TOY_DOMAINS
from mopd.config_schema import check_known_keys, describe_type, field_type
from mopd.core.algo import AdvantageConfig
from mopd.core.errors import ConfigError
from mopd.evaluate import EvalConfig
from mopd.teachers import TeacherConfig
from rollout.config import RolloutConfig
from trainer.config import TrainerConfig
from trainer.losses import loss_spec

WANDB_MODES = ("offline", "online", "disabled")
LOOPS = ("sync", "overlap")
TOY_ARCHS = ("qwen3_moe", "qwen3", "mimo_v2_flash")


@dataclass
class StudentConfig:
    model_path: str = MISSING  # HF checkpoint directory (config.json, safetensors, tokenizer)
    tokenizer_path: str | None = None  # defaults to model_path


@dataclass
class DataConfig:
    # JSONL rows: {prompt: str | chat messages, domain, label}; may be empty when env.kind has tasks
    # (each task is a row of the episode domain: mopd/data.py env_task_rows)
    train_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    domain_key: str = "domain"
    label_key: str = "label"
    shuffle: bool = True
    seed: int = 0
    # per-domain share of each step's prompts (sampling weights); empty = as the data comes
    domain_weights: dict[str, float] = field(default_factory=dict)
    # Prompts always or never solved teach little: with pass_rate_weighting, a prompt whose mean reward over
    # at least pass_rate_min_samples responses is <= pass_rate_low or >= pass_rate_high is drawn only with
    # chance pass_rate_keep when its turn comes (seeded; the rewards seen are part of the checkpoint)
    pass_rate_weighting: bool = False
    pass_rate_low: float = 0.0
    pass_rate_high: float = 1.0
    pass_rate_min_samples: int = 4
    pass_rate_keep: float = 0.25


@dataclass
class DynamicSamplingConfig:
    """Groups without learning signal are filtered and replaced by further groups (mopd/dynamic_sampling.py);
    needs rollout.scheduler=sequence, which draws the replacements."""

    filter_groups: bool = False
    # a group of equal rewards is still kept while its mean teacher reverse KL per token (MOPD) is at least
    # this many nats: the teacher still has something to teach
    filter_kl_threshold: float = 0.05
    # the run stops with an error once this many batches' worth of groups (x rollout.prompts_per_step) are
    # filtered while one batch is assembled (DAPO's max_num_gen_batches): data with no signal left would
    # otherwise be drawn forever; 0 = no limit
    max_filtered_batches: int = 10


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
    # outputs/DATE/TIME by default (a multirun job: its own directory under multirun/); Hydra's
    # output directory is this directory too (configs/config.yaml), so a run writes nowhere else
    run_dir: str = "${mopd.run_dir:}"
    num_steps: int = 20
    resume: bool = False
    seed: int = 0
    save_interval: int = 10  # checkpoint every N steps (and at the end); 0 = only at the end
    eval_interval: int = 0  # held-out accuracy per domain every N steps (and at the end); 0 = off
    max_sampled_tokens: int = 0  # stop once this many response tokens were sampled; 0 = no budget
    dump_samples: bool = False  # write run_dir/samples/step_N.jsonl (prompt, response, reward, teacher KL)
    default_teacher: str | None = None  # scores prompts whose domain no teacher lists
    ray_address: str | None = None  # None = start an embedded Ray cluster
    ray_num_cpus: int | None = None  # embedded cluster only; None = what the job needs
    # sync: generate, then train (mopd/train.py); overlap: generation keeps running while the trainer trains
    # (mopd/train_async.py; needs rollout.scheduler=sequence, bounded by rollout.max_staleness)
    loop: str = "sync"
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algo: AdvantageConfig = field(default_factory=AdvantageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)

    @property
    def uses_teachers(self) -> bool:
        """Whether the loss has a teacher term (trainer/losses.py: needs_teacher) that is switched on."""
        return loss_spec(self.trainer.loss).needs_teacher and self.algo.teacher_coef > 0


def default_run_dir() -> str:
    """`run_dir` when none is given: outputs/DATE/TIME, or in a multirun sweep the job's own directory.

    Hydra's run directory is `${run_dir}` (configs/config.yaml), so the default cannot be
    `${hydra:runtime.output_dir}` (a cycle); Hydra caches the value per composed config.
    """
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(HydraConfig.get().runtime.output_dir)
    return datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S")


def register_configs() -> None:
    """Register the job schema; it types every group's YAML merged into it (unknown keys are errors)."""
    ConfigStore.instance().store(name="mopd_schema", node=JobConfig)
    if not OmegaConf.has_resolver("mopd.run_dir"):
        OmegaConf.register_new_resolver("mopd.run_dir", default_run_dir, use_cache=True)


def to_job_config(cfg: DictConfig | JobConfig) -> JobConfig:
    """Resolve interpolations, type-check, and validate a Hydra config into a JobConfig.

    Every failure is a ConfigError naming the field: keys the schema lacks (`+rollout.typo=1` is
    accepted by Hydra), values of the wrong type, missing values and broken interpolations.
    """
    if isinstance(cfg, JobConfig):
        job = cfg
    else:
        try:
            # resolved against the composed config, whose resolver cache holds the run directory
            # Hydra already created; "???" stays and is reported below as a missing value
            values = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as e:
            raise config_error_from(e) from None
        check_known_keys(values, JobConfig)
        try:
            job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), values))
        except MissingMandatoryValue as e:
            raise ConfigError(e.full_key, "a value (this field is required and has no default)") from None
        except OmegaConfBaseException as e:
            raise config_error_from(e) from None
    validate_static(job)
    return job


def config_error_from(e: BaseException) -> ConfigError:
    """A Hydra or OmegaConf error (wrong type, unknown key, bad override...) as a ConfigError naming the field."""
    if isinstance(e, ConfigError):
        return e
    cause: BaseException = e
    if isinstance(e, HydraException):
        cause = e.__cause__ or e.__context__ or e
    if isinstance(cause, ConfigError):
        return cause
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    hydra_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if cause is not e and hydra_line.startswith("In '"):  # the config file it came from
        first_line += f"; {hydra_line.split(':')[0].lower()}"
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and full_key:
        tp = field_type(str(full_key), JobConfig)
        if tp is None:
            return ConfigError(str(full_key), f"a field the schema defines (mopd/config.py) ({first_line})")
        return ConfigError(str(full_key), f"{describe_type(tp)} ({first_line})")
    if isinstance(e, MissingConfigException):
        group = (e.missing_cfg_file or "config").split("/")[0]
        options = " ".join(str(e).split())  # Hydra lists the available options after the first line
        return ConfigError(group, f"an existing config ({options})")
    if isinstance(e, OverrideParseException):
        return ConfigError(str(e.override), f"an override KEY=VALUE in Hydra's grammar ({first_line})")
    return ConfigError("command line", first_line)


def _finite_numbers(value: Any, prefix: str) -> None:
    """Every float field and every float in a mapping of numbers is finite (NaN/inf pass `x < 0`)."""
    for f in dataclasses.fields(value):
        item, path = getattr(value, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(item):
            _finite_numbers(item, f"{path}.")
        elif isinstance(item, dict):
            for k, v in item.items():
                if dataclasses.is_dataclass(v):
                    _finite_numbers(v, f"{path}.{k}.")
                elif isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{path}.{k}", "a finite number", v)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(path, "a finite number", item)


def validate_static(job: JobConfig) -> None:
    """Checks that need nothing but the config itself (no files, no data, no machine)."""
    _finite_numbers(job, "")
    if not job.run_dir:
        raise ConfigError("run_dir", "a directory path", job.run_dir)
    if job.num_steps < 1:
        raise ConfigError("num_steps", "an integer >= 1", job.num_steps)
    if job.save_interval < 0:
        raise ConfigError("save_interval", "an integer >= 0", job.save_interval)
    if job.seed < 0:
        raise ConfigError("seed", "an integer >= 0", job.seed)
    if job.ray_num_cpus is not None and job.ray_num_cpus < 1:
        raise ConfigError("ray_num_cpus", "null (what the job needs) or an integer >= 1", job.ray_num_cpus)
    if job.logger.wandb_mode not in WANDB_MODES:
        raise ConfigError("logger.wandb_mode", f"one of {WANDB_MODES}", job.logger.wandb_mode)
    if not job.logger.project:
        raise ConfigError("logger.project", "a non-empty wandb project name", job.logger.project)
    if job.max_sampled_tokens < 0:
        raise ConfigError("max_sampled_tokens", "an integer >= 0 (0 = no budget)", job.max_sampled_tokens)
    if not job.student.model_path:
        raise ConfigError("student.model_path", "an HF checkpoint directory", job.student.model_path)
    if job.student.tokenizer_path == "":
        raise ConfigError("student.tokenizer_path", "null (= model_path) or a tokenizer directory", "")
    if job.rollout.sample_from == "teacher" and job.trainer.loss != "sft":
        raise ConfigError("rollout.sample_from", "student unless trainer.loss=sft (teacher samples are "
                          "off-policy: the importance mask of mopd/grpo would discard them)", "teacher")
    if job.rollout.sample_from == "teacher" and not job.teachers:
        raise ConfigError("teachers", "at least one teacher when rollout.sample_from=teacher", {})
    if job.rollout.sample_from == "teacher" and job.env.kind != "verifiable":
        raise ConfigError("rollout.sample_from", "student when env.kind is a multi-turn environment (teachers "
                          "generate single turns only)", "teacher")
    job.rollout.validate("rollout")
    job.trainer.validate("trainer")
    engine_tp = max(job.rollout.gpus_per_engine, 1)  # SGLang's --tp-size: the one place the engines' TP is set
    if job.trainer.weight_sync_engine_tp not in (0, engine_tp):
        raise ConfigError("trainer.weight_sync_engine_tp", f"0 (derived) or the engines' TP size, "
                          f"rollout.gpus_per_engine = {engine_tp}", job.trainer.weight_sync_engine_tp)
    job.algo.validate("algo")
    _validate_algo(job)
    job.env.validate("env")
    if job.env.max_new_tokens >= job.rollout.max_context_len:
        raise ConfigError("env.max_new_tokens", f"fewer than rollout.max_context_len={job.rollout.max_context_len}",
                          job.env.max_new_tokens)
    _validate_data(job.data)
    _validate_loop(job)
    _validate_toy(job)
    if job.eval_interval < 0:
        raise ConfigError("eval_interval", "an integer >= 0 (0 = no evaluation during training)", job.eval_interval)
    job.eval.validate("eval", during_training=job.eval_interval > 0, toy_dir=job.toy.dir)
    _validate_teachers(job)


def _validate_algo(job: JobConfig) -> None:
    """What `AdvantageConfig.validate` (mopd/core/algo.py) does not check yet."""
    if job.algo.grpo_normalize_std and job.algo.grpo_eps <= 0:
        raise ConfigError("algo.grpo_eps", "a number > 0 when algo.grpo_normalize_std=true (a group of equal "
                          "rewards has std 0)", job.algo.grpo_eps)
    if job.algo.grpo_eps < 0:
        raise ConfigError("algo.grpo_eps", "a number >= 0", job.algo.grpo_eps)


def _validate_data(data: DataConfig) -> None:
    if any(not f for f in data.train_files):
        raise ConfigError("data.train_files", "a list of JSONL file paths (non-empty strings)", data.train_files)
    keys = {"prompt_key": data.prompt_key, "domain_key": data.domain_key, "label_key": data.label_key}
    for name, key in keys.items():
        if not key:
            raise ConfigError(f"data.{name}", "a non-empty column name", key)
    if len(set(keys.values())) < len(keys):
        raise ConfigError("data.label_key", f"three different column names (got {keys})", data.label_key)
    if data.seed < 0:
        raise ConfigError("data.seed", "an integer >= 0", data.seed)
    weights = data.domain_weights
    if any(w < 0 for w in weights.values()) or (weights and sum(weights.values()) <= 0):
        raise ConfigError("data.domain_weights", "non-negative weights with a positive sum", dict(weights))
    if not data.pass_rate_low < data.pass_rate_high:
        raise ConfigError("data.pass_rate_high", f"a number > data.pass_rate_low={data.pass_rate_low}",
                          data.pass_rate_high)
    if data.pass_rate_min_samples < 1:
        raise ConfigError("data.pass_rate_min_samples", "an integer >= 1", data.pass_rate_min_samples)
    if not 0 < data.pass_rate_keep <= 1:
        raise ConfigError("data.pass_rate_keep", "a number in (0, 1] (0 would never draw such a prompt again)",
                          data.pass_rate_keep)


def _validate_loop(job: JobConfig) -> None:
    """Which loop, scheduler, partial rollout and staleness bound go together."""
    rollout = job.rollout
    if job.loop not in LOOPS:
        raise ConfigError("loop", f"one of {LOOPS}", job.loop)
    sequence = rollout.scheduler == "sequence"
    if job.loop == "overlap" and not sequence:
        raise ConfigError("loop", "sync unless rollout.scheduler=sequence (the overlap loop generates while the "
                          "trainer trains, sequence by sequence)", job.loop)
    if rollout.partial_rollout and not sequence:
        raise ConfigError("rollout.partial_rollout", "false unless rollout.scheduler=sequence (batches keep no "
                          "sequence in flight)", True)
    if job.dynamic_sampling.filter_groups and not sequence:
        raise ConfigError("dynamic_sampling.filter_groups", "false unless rollout.scheduler=sequence (it draws the "
                          "groups that replace filtered ones)", True)
    if sequence and rollout.sample_from != "student":
        raise ConfigError("rollout.scheduler", "batch when rollout.sample_from=teacher (teachers generate whole "
                          "batches)", rollout.scheduler)
    if (rollout.partial_rollout or job.loop == "overlap") and rollout.max_staleness < 1:
        raise ConfigError("rollout.max_staleness", "an integer >= 1 with rollout.partial_rollout or loop=overlap "
                          "(their tokens are sampled by weights at least one version old)", rollout.max_staleness)
    if not isinstance(job.dynamic_sampling.max_filtered_batches, int) or job.dynamic_sampling.max_filtered_batches < 0:
        raise ConfigError("dynamic_sampling.max_filtered_batches", "an integer >= 0 (0 = no limit)",
                          job.dynamic_sampling.max_filtered_batches)
    if job.dynamic_sampling.filter_kl_threshold < 0:
        raise ConfigError("dynamic_sampling.filter_kl_threshold", "a number >= 0",
                          job.dynamic_sampling.filter_kl_threshold)


def _validate_toy(job: JobConfig) -> None:
    toy = job.toy
    if toy.dir == "":
        raise ConfigError("toy.dir", "null (no toy world) or a directory", toy.dir)
    unknown = [d for d in toy.domains if d not in TOY_DOMAINS]
    if unknown:
        raise ConfigError("toy.domains", f"a subset of the toy domains {sorted(TOY_DOMAINS)}", unknown)
    if not toy.domains or len(set(toy.domains)) < len(toy.domains):
        raise ConfigError("toy.domains", "a non-empty list of distinct toy domains", toy.domains)
    if toy.arch not in TOY_ARCHS:
        raise ConfigError("toy.arch", f"one of {TOY_ARCHS}", toy.arch)
    for name, low in (("base_steps", 0), ("teacher_steps", 1), ("num_layers", 1)):
        if getattr(toy, name) < low:
            raise ConfigError(f"toy.{name}", f"an integer >= {low}", getattr(toy, name))
    if toy.hidden_size < 8 or toy.hidden_size % 8:
        raise ConfigError("toy.hidden_size", "a positive multiple of 8 (4 attention heads of even size)",
                          toy.hidden_size)
    if toy.teacher_lr <= 0:
        raise ConfigError("toy.teacher_lr", "a number > 0", toy.teacher_lr)


def _validate_teachers(job: JobConfig) -> None:
    if job.uses_teachers and not job.teachers:
        raise ConfigError("teachers", f"at least one teacher when trainer.loss={job.trainer.loss} "
                          "(add one with +teacher@teachers.NAME=FILE)", {})
    owner: dict[str, str] = {}
    for name, teacher in job.teachers.items():
        where = f"teachers.{name}"
        teacher.validate(where)
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

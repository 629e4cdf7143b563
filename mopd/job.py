"""Start-up and shutdown of a training job: every check that can fail early runs before Ray starts.

The order is: static config checks (mopd/config.py) -> `preflight`: the machine, checkpoint paths,
every data row, domains against weights and teachers (seconds; also what `mopd-train --cfg job`
runs) -> toy world (if asked; minutes) -> vocabularies and tokenized data (the JSONL rows, then one
row per task of `env.kind`: mopd/data.py env_task_rows) -> run directory and resume point -> Ray,
engines, teachers, trainer -> the sequence scheduler (rollout.scheduler=sequence) -> logger. `Runtime` holds what the step loop in `mopd/train.py` needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import OmegaConf
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mopd.checkpoint import SCHEDULER_FILE, DriverState, latest_checkpoint
from mopd.config import JobConfig
from mopd.core.errors import ConfigError
from mopd.data import DataScheduler, check_domain_weights, env_task_rows, load_prompts, scan_domains
from mopd.run_logger import RunLogger
from mopd.teachers import TeacherRouter, TeacherSet, check_teacher_vocabularies
from mopd.toy.world import ToyWorldSpec, ensure_toy_world, toy_world_ready

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    job: JobConfig
    run_dir: Path
    tokenizer: PreTrainedTokenizerBase
    data: DataScheduler
    student_engines: object  # rollout.engine.EngineGroup
    rollout: object  # rollout.manager.RolloutManager
    teachers: TeacherSet
    trainer: object  # trainer.group.TrainerGroup
    logger: RunLogger
    start_step: int = 0
    weight_version: int = 0
    sampled_tokens: int = 0
    resources: ExitStack = field(default_factory=ExitStack)
    agentic: object = None  # mopd.agentic.AgenticEpisodes when env.kind is a multi-turn environment
    scheduler: object = None  # mopd.sequences.SequenceRollout when rollout.scheduler=sequence

    def close(self) -> None:
        self.resources.close()


def preflight(job: JobConfig) -> None:
    """Every check that builds and starts nothing: the machine, checkpoint paths, each data row, domains.

    Paths the toy world will create (under `toy.dir`, not built yet) are taken on trust; its data
    holds exactly `toy.domains`. Runs first in `prepare` and in `mopd-train --cfg job`.
    """
    check_machine(job)
    pending = _toy_pending(job)
    if not pending(job.student.model_path):
        _require_checkpoint("student.model_path", job.student.model_path)
        _check_context_len(job)
        _check_trainer_layout(job)
    for name, teacher in job.teachers.items():
        if teacher.backend in ("local", "sglang") and not pending(teacher.model_path):
            _require_checkpoint(f"teachers.{name}.model_path", teacher.model_path)
        if teacher.backend in ("local", "sglang") and teacher.max_context_len < job.rollout.max_context_len:
            raise ConfigError(f"teachers.{name}.max_context_len", f"at least rollout.max_context_len "
                              f"({job.rollout.max_context_len}): the teacher scores whole sequences",
                              teacher.max_context_len)
    domains: set[str] = set()
    for file in job.data.train_files:
        domains |= set(job.toy.domains) if pending(file) else scan_domains(job.data, file)
    domains |= {row[job.data.domain_key] for row in env_task_rows(job.env, job.data)}
    if not domains:
        raise ConfigError("data.train_files", "at least one JSONL file, unless env.kind has tasks to train on "
                          "(env=swe: its built-in tasks or env.tasks)", list(job.data.train_files))
    check_domain_weights(dict(job.data.domain_weights), domains)
    missing = sorted(job.env.episode_domains - domains)
    if missing:
        raise ConfigError("env.domains", f"data domains (the data holds {sorted(domains)}); no row has {missing}",
                          sorted(job.env.episode_domains))
    if job.uses_teachers:
        TeacherRouter.from_config(job.teachers, job.default_teacher).check_domains(domains)


def check_machine(job: JobConfig) -> None:
    """GPUs and CPUs an embedded Ray cluster cannot give would hang the job: refuse them here.

    With `ray_address` set the cluster is elsewhere (its GPUs are not this driver's), so only the
    device-independent checks apply.
    """
    if job.ray_address:
        return
    import torch

    cuda = torch.cuda.is_available()
    job.trainer.check_devices(cuda, "trainer")
    if not cuda:
        if job.rollout.gpus_per_engine > 0:
            raise ConfigError("rollout.gpus_per_engine", "0: CUDA is not available on this machine",
                              job.rollout.gpus_per_engine)
        for name, teacher in job.teachers.items():
            if teacher.backend != "remote" and teacher.gpus_per_engine > 0:
                raise ConfigError(f"teachers.{name}.gpus_per_engine", "0: CUDA is not available on this machine",
                                  teacher.gpus_per_engine)
    if job.ray_num_cpus is not None and job.ray_num_cpus < cpus_requested(job):
        raise ConfigError("ray_num_cpus", f"null or at least the {cpus_requested(job):g} CPUs the engines, teachers "
                          "and trainer ranks request (fewer leaves actors unscheduled)", job.ray_num_cpus)


def cpus_requested(job: JobConfig) -> float:
    """CPUs the job's Ray actors ask for: student engines, local teachers, trainer ranks."""
    return (job.rollout.num_engines * job.rollout.cpus_per_engine
            + sum(t.num_engines * t.cpus_per_engine for t in job.teachers.values() if t.backend != "remote")
            + job.trainer.world_size * job.trainer.cpus_per_rank)


def toy_spec(job: JobConfig) -> ToyWorldSpec:
    """The toy world this job asks for (its manifest tells whether the one on disk matches)."""
    return ToyWorldSpec(domains=tuple(job.toy.domains), arch=job.toy.arch, hidden_size=job.toy.hidden_size,
                        num_layers=job.toy.num_layers, base_steps=job.toy.base_steps,
                        teacher_steps=job.toy.teacher_steps, teacher_lr=job.toy.teacher_lr, seed=job.seed)


def _toy_pending(job: JobConfig) -> Callable[[str], bool]:
    """Whether a path is one the toy world has yet to create (under toy.dir, world not built)."""
    if not job.toy.dir or toy_world_ready(job.toy.dir, toy_spec(job)):
        return lambda path: False
    root = Path(job.toy.dir).resolve()
    return lambda path: bool(path) and Path(path).resolve().is_relative_to(root)


def prepare(job: JobConfig) -> tuple[PreTrainedTokenizerBase, DataScheduler]:
    """Everything that can be checked without starting a process: paths, vocabularies, data, routing."""
    preflight(job)
    if job.toy.dir:
        ensure_toy_world(job.toy.dir, toy_spec(job))
    _require_checkpoint("student.model_path", job.student.model_path)
    for name, teacher in job.teachers.items():
        if teacher.backend in ("local", "sglang"):
            _require_checkpoint(f"teachers.{name}.model_path", teacher.model_path)
    tokenizer = AutoTokenizer.from_pretrained(job.student.tokenizer_path or job.student.model_path)
    check_teacher_vocabularies(job.teachers, tokenizer)
    max_prompt_len = job.rollout.max_context_len - job.rollout.max_new_tokens
    rows = load_prompts(job.data, tokenizer, max_prompt_len, env_task_rows(job.env, job.data))
    data = DataScheduler(rows, job.data, group_size=job.rollout.n_samples_per_prompt)
    if job.uses_teachers:
        TeacherRouter.from_config(job.teachers, job.default_teacher).check_domains(data.domains)
    return tokenizer, data


def start(job: JobConfig, config_dict: dict) -> Runtime:
    tokenizer, data = prepare(job)
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config_dict), run_dir / "config.yaml")
    resume_from = latest_checkpoint(run_dir) if job.resume else None
    if job.resume and resume_from is None:
        log.warning("resume=true but %s has no checkpoint: starting from step 0", run_dir / "checkpoints")
    state = resume_from[1] if resume_from else DriverState(step=0)
    if resume_from:
        data.load_state_dict(state.data)
        if job.rollout.scheduler != "sequence" and (resume_from[0] / SCHEDULER_FILE).is_file():
            raise ConfigError("rollout.scheduler", f"sequence: the checkpoint {resume_from[0]} holds sequences in "
                              "flight, which the batch path would lose", job.rollout.scheduler)

    from rollout.engines import launch_engines
    from rollout.rollout_manager import RolloutManager
    from trainer.group import TrainerGroup

    stack = ExitStack()
    try:
        stack.callback(_init_ray(job))
        engines = launch_engines(job.student.model_path, job.rollout, name="student",
                                 routing_replay=job.rollout.routing_replay)
        stack.callback(engines.shutdown)
        teachers = TeacherSet.launch(job.teachers, job.default_teacher, sampling=job.rollout, tokenizer=tokenizer,
                                     temperature=job.algo.teacher_temperature,
                                     temperature_support=job.algo.teacher_temperature_support)
        stack.callback(teachers.close)
        trainer_cfg = replace(job.trainer, weight_sync_engine_tp=max(job.rollout.gpus_per_engine, 1))
        trainer = TrainerGroup(job.student.model_path, trainer_cfg, job.algo, num_steps=job.num_steps,
                               rollout_temperature=job.rollout.temperature)
        stack.callback(trainer.shutdown)
        if resume_from:
            trainer.load_checkpoint(str(resume_from[0] / "trainer"))
            trainer.push_weights(list(engines.urls), state.weight_version)
        agentic = None
        if job.env.episode_domains:
            from mopd.agentic import AgenticEpisodes

            agentic = AgenticEpisodes(job, tokenizer)
            stack.callback(agentic.close)
        rollout = RolloutManager(list(engines.urls), job.rollout, eos_token_id=tokenizer.eos_token_id,
                                 tokenizer=tokenizer, model_path=job.student.model_path, engines=engines,
                                 agent_loops=agentic.agent_loops() if agentic else None)
        asyncio.run(rollout.check_engines())
        scheduler = None
        if job.rollout.scheduler == "sequence":
            from mopd.sequences import SequenceRollout

            scheduler = SequenceRollout.create(job, rollout, data, teachers)
            stack.callback(scheduler.close)
            scheduler.start(state.weight_version, resume_from[0] if resume_from else None)
        logger = RunLogger(run_dir, job.logger, config_dict, total_steps=job.num_steps, start_step=state.step,
                           wandb_id=state.wandb_id)
        stack.callback(logger.close)
    except BaseException:
        stack.close()
        raise
    return Runtime(job=job, run_dir=run_dir, tokenizer=tokenizer, data=data, student_engines=engines,
                   rollout=rollout, teachers=teachers, trainer=trainer, logger=logger, start_step=state.step,
                   weight_version=state.weight_version, sampled_tokens=state.sampled_tokens, resources=stack,
                   agentic=agentic, scheduler=scheduler)


def _init_ray(job: JobConfig) -> Callable[[], None]:
    """Connect to the job's Ray cluster or start an embedded one; returns the shutdown function."""
    if not job.ray_address:
        # A single-node embedded cluster stays on loopback; Ray reads this when it is first imported,
        # which is why ray is imported here and not at the top of this module.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if job.ray_address:
        ray.init(address=job.ray_address)
        return ray.shutdown
    needed = cpus_requested(job)
    num_cpus = job.ray_num_cpus or max(int(needed + 0.999), os.cpu_count() or 1)
    # address="local": a new embedded cluster even when another Ray instance runs on this machine (ray.init()
    # alone would join the one `ray start` last recorded and then refuse num_cpus); joining is ray_address=auto.
    options = {"address": "local", "num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": False,
               "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}}
    try:
        ray.init(**options)
    except Exception:  # a loaded machine can miss Ray's start-up deadline once
        log.warning("Ray did not start; retrying once", exc_info=True)
        ray.shutdown()
        ray.init(**options)
    return ray.shutdown


def _check_trainer_layout(job: JobConfig) -> None:
    """The trainer's TP/PP/EP split must divide the student's heads, layers and experts: checked before any
    engine starts (TrainerGroup checks again before its ranks, for a toy student built later)."""
    from transformers import AutoConfig

    job.trainer.check_model(AutoConfig.from_pretrained(job.student.model_path), "trainer")


def _check_context_len(job: JobConfig) -> None:
    """A context longer than the student's position table fails mid-rollout; say so at start-up."""
    try:
        hf_config = json.loads((Path(job.student.model_path) / "config.json").read_text())
        limit = hf_config.get("max_position_embeddings") if isinstance(hf_config, dict) else None
    except (OSError, ValueError):
        raise ConfigError("student.model_path", "an HF checkpoint whose config.json is valid JSON",
                          job.student.model_path) from None
    if isinstance(limit, int) and job.rollout.max_context_len > limit:
        raise ConfigError("rollout.max_context_len", f"at most the student's max_position_embeddings ({limit})",
                          job.rollout.max_context_len)


def _require_checkpoint(field_name: str, path: str) -> None:
    if not path or not (Path(path) / "config.json").is_file():
        raise ConfigError(field_name, "an HF checkpoint directory containing config.json", path)

"""`mopd-train`: the MOPD step loop.

    generate -> score (verifier rewards + teacher logprobs) -> advantages -> train -> push weights
    -> [evaluate held-out prompts] -> log -> checkpoint

Each step is one short function; the packages that own the work (rollout/, trainer/, mopd/teachers,
mopd/rewards) do the heavy lifting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import hydra
from omegaconf import DictConfig, OmegaConf

from mopd import job as job_lib
from mopd.checkpoint import DriverState, step_dir, write_driver_state
from mopd.config import JobConfig, config_error_from, register_configs, to_job_config
from mopd.core.errors import ConfigError
from mopd.core.types import Sample
from mopd.evaluate import check_heldout_files, evaluate, flat_metrics, heldout_files, load_eval_rows
from mopd.rewards import assign_orm_advantages, score_outcomes
from rollout.speculative import step_metrics as speculative_metrics

log = logging.getLogger("mopd.train")
register_configs()


def generate(rt: job_lib.Runtime) -> list[Sample]:
    """Sample this step's responses: on-policy from the student, or from the teachers (off-policy SFT)."""
    cfg = rt.job.rollout
    samples = rt.data.make_samples(cfg.prompts_per_step, cfg.n_samples_per_prompt)
    if cfg.sample_from == "teacher":
        return asyncio.run(rt.teachers.generate(samples))
    if rt.agentic is not None:  # sandboxes for this step's episodes, ready before generation starts
        rt.agentic.prewarm(samples)
    return asyncio.run(rt.rollout.generate(samples))


def score(rt: job_lib.Runtime, samples: list[Sample]) -> None:
    """Outcome rewards from the verifiers, dense rewards from each sample's domain teacher."""
    score_outcomes(samples)
    if rt.job.uses_teachers:
        asyncio.run(rt.teachers.score(samples, top_k=rt.job.algo.teacher_top_k))


def compute_advantages(rt: job_lib.Runtime, samples: list[Sample]) -> None:
    """GRPO outcome advantages here; the dense teacher term needs log pi_theta and is formed in the loss."""
    assign_orm_advantages(samples, rt.job.algo)


def train(rt: job_lib.Runtime, samples: list[Sample]) -> dict[str, float]:
    """One optimizer step on the samples that carry loss (an aborted episode has none, and may lack routing)."""
    trainable = [s for s in samples if any(s.loss_mask)]
    if not trainable:
        log.warning("no sample of this step carries loss (every episode aborted): no optimizer step")
        return {}
    return rt.trainer.train_step(trainable)


def push_weights(rt: job_lib.Runtime) -> None:
    rt.weight_version += 1
    rt.trainer.push_weights(list(rt.student_engines.urls), rt.weight_version)


def step_metrics(rt: job_lib.Runtime, samples: list[Sample], train_metrics: dict[str, float],
                 timings: dict[str, float]) -> dict[str, float]:
    """Rollout, reward and per-teacher reverse-KL statistics of one step."""
    tokens = sum(s.num_response_tokens for s in samples)
    metrics: dict[str, float] = {
        "rollout/tokens": tokens,
        "rollout/samples": len(samples),
        "rollout/reward": sum(s.reward for s in samples) / max(len(samples), 1),
        "rollout/response_len": tokens / max(len(samples), 1),
        "rollout/tokens_per_s": tokens / max(timings["time/generate_s"], 1e-9),
        "rollout/abort_frac": sum(s.finish_reason == "abort" for s in samples) / max(len(samples), 1),
        "rollout/weight_version": rt.weight_version,
        "rollout/total_tokens": rt.sampled_tokens + tokens,
    }
    by_domain: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        by_domain[s.domain].append(s.reward)
    metrics.update({f"rollout/reward/{d}": sum(r) / len(r) for d, r in by_domain.items()})
    # Sample estimate of KL(student || teacher) per token: E_{y~student}[log mu(y) - log pi_T(y)].
    kl_sum: dict[str, float] = defaultdict(float)
    kl_count: dict[str, int] = defaultdict(int)
    for s in samples:
        if s.teacher_logprobs is None:
            continue
        for mask, mu, teacher_lp in zip(s.loss_mask, s.rollout_logprobs, s.teacher_logprobs):
            if mask:
                kl_sum[s.teacher] += mu - teacher_lp
                kl_count[s.teacher] += 1
    metrics.update({f"mopd/reverse_kl/{t}": kl_sum[t] / kl_count[t] for t in kl_count})
    metrics["rollout/prefill_tokens"] = sum(s.metadata.get("prefill_tokens", 0) for s in samples)
    metrics["rollout/cached_tokens"] = sum(s.metadata.get("cached_tokens", 0) for s in samples)
    if rt.agentic is not None:
        metrics.update(rt.agentic.metrics(samples))  # agent/turns, agent/tool_calls, tool latency p50/p99
    metrics.update(speculative_metrics(samples))  # rollout/spec_accept_len when the engines speculate
    metrics.update(train_metrics)
    metrics.update(timings)
    return metrics


def evaluate_heldout(rt: job_lib.Runtime, rows: dict[str, list[dict]], step: int) -> dict[str, float]:
    """Held-out accuracy per domain of the current weights (greedy; sampled when eval.samples > 0).

    The trainer's weights are exported to run_dir/eval/hf (overwritten each time) and generated from with
    mopd.evaluate, the same code as `mopd-eval`, so the curve and the final table measure alike.
    """
    ev = rt.job.eval
    path = rt.run_dir / "eval" / "hf"
    rt.trainer.export_hf(str(path))
    results = evaluate(path, rows, max_new_tokens=ev.max_new_tokens or rt.job.rollout.max_new_tokens,
                       samples=ev.samples, temperature=ev.temperature, seed=rt.job.seed + step)
    return {**flat_metrics(results), "eval/sampled_tokens": rt.sampled_tokens}


def eval_due(job: JobConfig, step: int) -> bool:
    """After every `eval_interval`-th step, and after the last one."""
    return job.eval_interval > 0 and ((step + 1) % job.eval_interval == 0 or step + 1 >= job.num_steps)


def checkpoint(rt: job_lib.Runtime, step: int) -> None:
    """Trainer state + HF export first; driver.json last marks the checkpoint complete."""
    path = step_dir(rt.run_dir, step + 1)
    path.mkdir(parents=True, exist_ok=True)
    rt.trainer.save_checkpoint(str(path / "trainer"))
    rt.trainer.export_hf(str(path / "hf"))
    write_driver_state(path, DriverState(step=step + 1, data=rt.data.state_dict(), weight_version=rt.weight_version,
                                         wandb_id=rt.logger.wandb_id, sampled_tokens=rt.sampled_tokens))


def finished(rt: job_lib.Runtime, step: int) -> bool:
    """Stop after num_steps, or once the sampled-token budget (max_sampled_tokens) is spent."""
    budget = rt.job.max_sampled_tokens
    return step >= rt.job.num_steps or (budget > 0 and rt.sampled_tokens >= budget)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[f"time/{name}_s"] = time.perf_counter() - start


def run(job: JobConfig, config_dict: dict | None = None) -> None:
    check_heldout_files(job)
    rt = job_lib.start(job, config_dict or OmegaConf.to_container(OmegaConf.structured(job)))
    heldout = load_eval_rows(heldout_files(job), job.eval.per_domain) if job.eval_interval > 0 else {}
    try:
        step = rt.start_step
        while not finished(rt, step):
            timings: dict[str, float] = {}
            with timed(timings, "step"):
                with timed(timings, "generate"):
                    samples = generate(rt)
                with timed(timings, "score"):
                    score(rt, samples)
                compute_advantages(rt, samples)
                with timed(timings, "train"):
                    train_metrics = train(rt, samples)
                with timed(timings, "push"):
                    push_weights(rt)
            metrics = step_metrics(rt, samples, train_metrics, timings)
            rt.sampled_tokens += sum(s.num_response_tokens for s in samples)
            if eval_due(job, step) or (heldout and finished(rt, step + 1)):
                with timed(metrics, "eval"):
                    metrics.update(evaluate_heldout(rt, heldout, step))
            rt.logger.log(step, metrics)
            if job.dump_samples:
                rt.logger.dump_samples(step, samples, rt.tokenizer)
            if finished(rt, step + 1) or (job.save_interval > 0 and (step + 1) % job.save_interval == 0):
                checkpoint(rt, step)
            step += 1
    finally:
        rt.close()


def check_config(cfg: DictConfig) -> JobConfig:
    """Every start-up check that builds and starts nothing: types, keys, ranges, the machine, files, data rows.

    `mopd-train` runs these first (`to_job_config`, then `job.start` -> `prepare` -> `preflight`,
    before the toy world is built or Ray starts); `mopd-train ... --cfg job` runs only these.
    """
    job = to_job_config(cfg)
    job_lib.preflight(job)
    check_heldout_files(job)
    return job


def compose_config(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> DictConfig:
    """The job config composed as `mopd-train` composes it (Hydra compose API, no run directory)."""
    from hydra import compose, initialize_config_module

    if config_dir:  # what --config-dir does: search the user's directory first
        overrides = [*overrides, f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]"]
    try:
        with initialize_config_module(config_module="configs", version_base=None):
            return compose(config_name=config_name, overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - every composition failure is a config error, named
        raise config_error_from(e) from None


def check_command_line(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> JobConfig:
    """Compose and check a command line's overrides in-process: the checks `mopd-train` runs first."""
    return check_config(compose_config(overrides, config_name, config_dir))


_task_started = False


@hydra.main(version_base=None, config_path="pkg://configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    try:
        run(to_job_config(cfg))  # job.start runs job_lib.preflight before building or starting anything
    except ConfigError as e:  # a user error: say what is wrong, no traceback
        log.error("%s", e)
        sys.exit(2)


def main() -> None:
    """`mopd-train`: Hydra's CLI, with every config error (composition included) exiting 2 and naming the field.

    Hydra reports its own errors (a wrong type, an unknown config group) and exits 1; it raises
    them instead when HYDRA_FULL_ERROR=1, which lets them be reported like every other config
    error. `--cfg` prints the config without running the job, then checks it (exit 2 if invalid).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    args = get_args_parser().parse_args()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
        if args.cfg and not (args.help or args.hydra_help):  # printed; now the verdict: exit 0 or 2
            check_command_line(args.overrides, args.config_name or "config", args.config_dir)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    except Exception as e:  # only errors before the job started are config errors
        if _task_started:
            raise
        log.error("%s", config_error_from(e))
        sys.exit(2)


if __name__ == "__main__":
    main()

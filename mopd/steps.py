"""The phases of one training step, one short function each, shared by the step loops: mopd/train.py
(sync) and mopd/train_async.py (overlap).

    generate -> score (verifier rewards + teacher logprobs) -> advantages -> train -> push weights
    -> end_step: metrics, [evaluate held-out prompts], log, [checkpoint]

With rollout.scheduler=sequence, generate draws scored groups from the sequence scheduler
(mopd/sequences.py) and the push pauses and resumes its sequences. The packages that own the work
(rollout/, trainer/, mopd/teachers, mopd/rewards) do the heavy lifting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import OmegaConf

from mopd import job as job_lib
from mopd import sequences
from mopd.checkpoint import DriverState, step_dir, write_driver_state
from mopd.config import JobConfig
from mopd.core.types import Sample
from mopd.evaluate import check_heldout_files, evaluate, flat_metrics, heldout_files, load_eval_rows
from mopd.rewards import assign_orm_advantages, score_outcomes
from rollout.speculative import step_metrics as speculative_metrics

log = logging.getLogger("mopd.train")


def generate(rt: job_lib.Runtime) -> list[Sample]:
    """Sample this step's responses: on-policy from the student, or from the teachers (off-policy SFT)."""
    cfg = rt.job.rollout
    if rt.scheduler is not None:  # sequence by sequence, each group scored as it finished
        return rt.scheduler.generate(cfg.prompts_per_step, rt.weight_version)
    samples = rt.data.make_samples(cfg.prompts_per_step, cfg.n_samples_per_prompt)
    if cfg.sample_from == "teacher":
        return asyncio.run(rt.teachers.generate(samples))
    if rt.agentic is not None:  # sandboxes for this step's episodes, ready before generation starts
        rt.agentic.prewarm(samples)
    return asyncio.run(rt.rollout.generate(samples))


def score(rt: job_lib.Runtime, samples: list[Sample]) -> None:
    """Outcome rewards from the verifiers, dense rewards from each sample's domain teacher."""
    if rt.scheduler is not None:  # done group by group on the scheduler (mopd/dynamic_sampling.py)
        return
    score_outcomes(samples)
    rt.data.record_outcomes(samples)
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
    for sample in trainable:  # the loss measures each token's staleness against it (Sample.weight_versions)
        sample.metadata["policy_version"] = rt.weight_version
    return rt.trainer.train_step(trainable)


def push_weights(rt: job_lib.Runtime) -> None:
    """The trained weights to the engines as the next version (sequences in flight paused meanwhile)."""
    rt.weight_version += 1
    with sequences.weights_pushed(rt.scheduler, rt.weight_version):
        rt.trainer.push_weights(list(rt.student_engines.urls), rt.weight_version)


def step_metrics(rt: job_lib.Runtime, samples: list[Sample], train_metrics: dict[str, float],
                 timings: dict[str, float]) -> dict[str, float]:
    """Rollout, reward and per-teacher reverse-KL statistics of one step."""
    tokens = sum(s.num_response_tokens for s in samples)
    # the overlap loop generates the whole step long, not only while the driver waits for the batch
    generate_s = timings["time/generate_s"] if "time/generate_s" in timings else timings["time/step_s"]
    metrics: dict[str, float] = {
        "rollout/tokens": tokens,
        "rollout/samples": len(samples),
        "rollout/reward": sum(s.reward for s in samples) / max(len(samples), 1),
        "rollout/response_len": tokens / max(len(samples), 1),
        "rollout/tokens_per_s": tokens / max(generate_s, 1e-9),
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
    # the sequences in flight and the data streams' position of the same instant (no prompt lost or repeated)
    data = rt.scheduler.save(path) if rt.scheduler is not None else rt.data.state_dict()
    write_driver_state(path, DriverState(step=step + 1, data=data, weight_version=rt.weight_version,
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


def end_step(rt: job_lib.Runtime, step: int, samples: list[Sample], train_metrics: dict[str, float],
             timings: dict[str, float], heldout: dict[str, list[dict]]) -> None:
    """After the push: metrics, [held-out evaluation], log, [sample dump], [checkpoint]."""
    job = rt.job
    metrics = step_metrics(rt, samples, train_metrics, timings)
    if rt.scheduler is not None:  # staleness, filtered groups, partial samples, pass rates...
        metrics.update(rt.scheduler.metrics())
    rt.sampled_tokens += sum(s.num_response_tokens for s in samples)
    if eval_due(job, step) or (heldout and finished(rt, step + 1)):
        with timed(metrics, "eval"):
            metrics.update(evaluate_heldout(rt, heldout, step))
    rt.logger.log(step, metrics)
    if job.dump_samples:
        rt.logger.dump_samples(step, samples, rt.tokenizer)
    if finished(rt, step + 1) or (job.save_interval > 0 and (step + 1) % job.save_interval == 0):
        checkpoint(rt, step)


def start(job: JobConfig, config_dict: dict | None = None) -> tuple[job_lib.Runtime, dict[str, list[dict]]]:
    """The job's runtime and its held-out rows (none unless eval_interval > 0)."""
    check_heldout_files(job)
    rt = job_lib.start(job, config_dict or OmegaConf.to_container(OmegaConf.structured(job)))
    try:
        return rt, load_eval_rows(heldout_files(job), job.eval.per_domain) if job.eval_interval > 0 else {}
    except BaseException:
        rt.close()
        raise

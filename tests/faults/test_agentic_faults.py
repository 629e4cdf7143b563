"""Faults inside agentic episodes, on the real stack of `mopd-train experiment=agentic_dry_run`: every
sandbox killed (SIGKILL, process group) while its episodes are between turns. The step must complete with
every sample; an episode either continued on a rebuilt sandbox (the Toolbox replays the session) or was
aborted, counted, and carries no loss (issue 13, deliverable 7)."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import ray
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mopd import job as job_lib
from mopd import train as train_lib
from mopd.config import register_configs, to_job_config
from mopd.core.types import Sample
from tests.faults.conftest import descendant_pids

pytestmark = pytest.mark.slow
register_configs()

PROMPTS, PER_PROMPT = 4, 2
FAST = ["experiment=agentic_dry_run", "toy.teacher_steps=5", "logger.progress=false", "logger.wandb_mode=disabled",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={PER_PROMPT}", "num_steps=2"]
LS_CALL = '<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>'
SANDBOX_AGENT = os.path.join("envs", "sandbox", "agent.py")


def _runtime(run_dir: Path) -> job_lib.Runtime:
    with initialize_config_module(config_module="configs", version_base=None):
        cfg = compose(config_name="config", overrides=[*FAST, f"run_dir={run_dir}"])
    return job_lib.start(to_job_config(cfg), OmegaConf.to_container(cfg, resolve=True))


def _step(rt: job_lib.Runtime) -> tuple[list[Sample], dict[str, float]]:
    """One step of mopd.train's loop (the same functions) and its metrics."""
    samples = train_lib.generate(rt)
    train_lib.score(rt, samples)
    train_lib.compute_advantages(rt, samples)
    train_metrics = train_lib.train(rt, samples)
    train_lib.push_weights(rt)
    return samples, train_lib.step_metrics(rt, samples, train_metrics, {"time/generate_s": 1.0})


def _kill_sandboxes() -> int:
    """SIGKILL every sandbox agent below this process (the Toolbox workers' sandboxes) with its jail."""
    pids = descendant_pids(SANDBOX_AGENT)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def test_sandboxes_killed_mid_episode_never_crash_the_step(tmp_path: Path):
    rt = _runtime(tmp_path / "run")
    try:
        _step(rt)  # step 0: no fault
        manager = rt.agentic.sessions.manager
        plain_step = manager.step
        calls: Counter[str] = Counter()
        killed: list[int] = []
        after_kill: list = []

        async def step_after_kill(session_id, action, timeout=None):
            calls[session_id] += 1
            if calls[session_id] == 2 and not killed:  # mid-episode: this session's first call is done
                killed.append(_kill_sandboxes())
                # the untrained toy student rarely writes a well-formed call, and only a call that reaches
                # the sandbox meets the dead one: this episode's next call is made one (its tokens stay)
                result = await plain_step(session_id, LS_CALL, timeout)
                after_kill.append(result)
                return result
            return await plain_step(session_id, action, timeout)

        manager.step = step_after_kill
        before = ray.get(rt.agentic.toolbox.stats.remote())
        samples, metrics = _step(rt)
        after = ray.get(rt.agentic.toolbox.stats.remote())
    finally:
        rt.close()
    assert killed and killed[0] >= 1, "no sandbox was killed mid-episode"
    assert sorted(Counter(s.prompt_index for s in samples).values()) == [PER_PROMPT] * PROMPTS
    episodes = [s for s in samples if s.domain == "tool"]
    assert episodes
    aborted = [s for s in episodes if s.finish_reason == "abort"]
    for s in aborted:
        assert not any(s.loss_mask), s  # counted, no loss
    for s in episodes:
        assert s.finish_reason in ("stop", "length", "abort"), s
        assert len(s.loss_mask) == len(s.response_ids) == len(s.rollout_logprobs)
    assert metrics["agent/aborted"] == len(aborted)
    assert metrics["rollout/abort_frac"] == pytest.approx(len(aborted) / len(samples))
    # the call that met its dead sandbox was retried on a rebuilt one with the session's history replayed,
    # and the episode went on with a real observation, not an error
    [result] = after_kill
    assert "error" not in result.info and result.info["attempts"] >= 2, result
    assert "[no output]" not in result.observation, result  # `ls` shows the task's file in the rebuilt workdir
    assert after["retried_calls"] > before["retried_calls"], (before, after)
    assert after["replayed_sessions"] > before["replayed_sessions"], (before, after)

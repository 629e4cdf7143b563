"""Kill parts of a running job mid-step, on the real stack, and check that nothing is lost or duplicated.

Embedded Ray, local engines (`python -m rollout.hf_server`), a Megatron trainer rank on CPU, and the
toolbox's local sandboxes. Each case kills one part mid-step and checks: the step finishes (or the run
stops with a clear error and `resume=true` continues exactly), every prompt's samples come back exactly
once, and engines that were restarted serve the latest pushed weights. Each case also records what it
cost against the same step without the fault (benchmarks/faults/run.py prints the table).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mopd import job as job_lib
from mopd import train as train_lib
from mopd.config import JobConfig, register_configs, to_job_config
from mopd.core.types import Sample
from rollout.engine_client import EngineClient
from tests.faults.conftest import descendant_pids

pytestmark = pytest.mark.slow
register_configs()

PROMPTS, PER_PROMPT = 4, 2
FAST = ["experiment=dry_run", "toy.teacher_steps=5", "logger.progress=false", "logger.wandb_mode=disabled",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={PER_PROMPT}",
        "rollout.max_new_tokens=24", "rollout.max_retries=3", "rollout.startup_timeout_s=120"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults") / "toy"


def _job(run_dir: Path, toy_dir: Path, *overrides: str) -> tuple[JobConfig, dict]:
    with initialize_config_module(config_module="configs", version_base=None):
        cfg = compose(config_name="config", overrides=[*FAST, f"run_dir={run_dir}", f"toy.dir={toy_dir}",
                                                       *overrides])
    return to_job_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def _step(rt: job_lib.Runtime, before_generate=None, before_score=None) -> tuple[list[Sample], float]:
    """One step of mopd.train's loop (the same functions), with optional fault hooks; returns samples, seconds."""
    start = time.perf_counter()
    if before_generate:
        before_generate()
    samples = train_lib.generate(rt)
    if before_score:
        before_score(samples)
    train_lib.score(rt, samples)
    train_lib.compute_advantages(rt, samples)
    train_lib.train(rt, samples)
    train_lib.push_weights(rt)
    return samples, time.perf_counter() - start


def _check_exactly_once(samples: list[Sample], step: int) -> None:
    """PROMPTS prompts of this step, PER_PROMPT complete samples each: none lost, none duplicated."""
    counts = Counter(s.prompt_index for s in samples)
    assert sorted(counts) == list(range(step * PROMPTS, (step + 1) * PROMPTS)), counts
    assert set(counts.values()) == {PER_PROMPT}, counts
    for s in samples:
        assert s.response_ids and s.finish_reason in ("stop", "length"), s
        assert len(s.rollout_logprobs) == len(s.response_ids)


def _engine_versions(urls: list[str]) -> list[str]:
    async def one(url: str) -> str:
        async with EngineClient(url) as client:
            return (await client.model_info())["weight_version"]

    async def all_() -> list[str]:
        return list(await asyncio.gather(*(one(u) for u in urls)))

    return asyncio.run(all_())


def _requests_on(url: str) -> int:
    """Requests the local engine at `url` is running or has queued (its /metrics); 0 if it does not answer."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=1) as resp:
            lines = resp.read().decode().splitlines()
    except OSError:
        return 0
    names = ("hf_server_num_running_reqs", "hf_server_num_queue_reqs")
    return sum(int(line.split()[1]) for line in lines if line.split()[0] in names)


def _kill_when_busy(rt: job_lib.Runtime, pid: int, killed: threading.Event, timeout: float = 60) -> None:
    """SIGKILL the engine server `pid` as soon as the rollout holds requests on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _requests_on(rt.student_engines.urls[0]) > 0:
            # at once: requests of a tiny model can all finish within tens of milliseconds, and one sent but
            # not yet received fails over all the same
            os.kill(pid, signal.SIGKILL)
            killed.set()
            return
        time.sleep(0.002)


def test_student_engine_and_teacher_replica_killed_mid_step(toy_dir, tmp_path, fault_report):
    job, cfg = _job(tmp_path / "run", toy_dir, "num_steps=3")
    rt = job_lib.start(job, cfg)
    try:
        samples, baseline_s = _step(rt)  # step 0: no fault (weights v1 pushed at its end)
        _check_exactly_once(samples, 0)

        # step 1: the only student engine dies while it holds the step's requests
        student = rt.student_engines.actors[0]
        victim = ray.get(student.pid.remote())
        killed = threading.Event()
        killer = threading.Thread(target=_kill_when_busy, args=(rt, victim, killed), daemon=True)
        checked: dict[str, Any] = {}

        def check_rollout(samples: list[Sample]) -> None:
            # the restarted engine served v1, the trainer's current weights (not the original checkpoint)
            checked["versions"] = {v for s in samples for v in s.weight_versions}
            theta = rt.trainer.compute_logprobs(samples)
            checked["max_logprob_gap"] = max(float(np.max(np.abs(np.asarray(s.rollout_logprobs) - t)))
                                             for s, t in zip(samples, theta))

        samples, student_s = _step(rt, before_generate=killer.start, before_score=check_rollout)
        assert killed.is_set(), "the engine was not killed mid-step"
        _check_exactly_once(samples, 1)
        status = ray.get(student.status.remote())
        assert status["pid"] != victim and status["served_version"] == "1"
        assert checked["versions"] == {1}, checked
        assert checked["max_logprob_gap"] < 1e-3, checked

        # step 2: the arith teacher's only replica dies between rollout and scoring
        teacher = rt.teachers.teachers["arith"]
        t_actor = teacher.engines.actors[0]
        t_victim = ray.get(t_actor.pid.remote())

        def kill_teacher(samples: list[Sample]) -> None:
            os.kill(t_victim, signal.SIGKILL)

        samples, teacher_s = _step(rt, before_score=kill_teacher)
        _check_exactly_once(samples, 2)
        assert all(s.teacher_logprobs is not None and len(s.teacher_logprobs) == len(s.response_ids)
                   for s in samples)
        assert ray.get(t_actor.pid.remote()) != t_victim
        arith = [s for s in samples if s.teacher == "arith"]
        again = asyncio.run(teacher.score(arith, 0))  # the restarted teacher gives the same scores
        np.testing.assert_allclose(np.concatenate([t.logprobs for t in again]),
                                   np.concatenate([s.teacher_logprobs for s in arith]), atol=1e-5)
        assert _engine_versions(rt.student_engines.urls) == [str(rt.weight_version)] == ["3"]

        # step 3: the engine's Ray actor process dies mid-rollout (its server goes with it); Ray restarts
        # the actor, which starts the server again on the same URL from the latest pushed weights (v3)
        actor_victim = ray.get(student.actor_pid.remote())
        killed.clear()
        killer = threading.Thread(target=_kill_when_busy, args=(rt, actor_victim, killed), daemon=True)
        samples, actor_s = _step(rt, before_generate=killer.start, before_score=check_rollout)
        assert killed.is_set(), "the engine actor was not killed mid-step"
        _check_exactly_once(samples, 3)
        assert ray.get(student.actor_pid.remote()) != actor_victim
        assert checked["versions"] == {3} and checked["max_logprob_gap"] < 1e-3, checked
        # v3, or v4 when the old server (SIGTERMed with its actor) finished the requests and the new one
        # started only after the step's push: either way the latest weights at its start
        assert ray.get(student.status.remote())["served_version"] in ("3", "4")
        # every student engine, restarted or not, reports the latest pushed version
        assert _engine_versions(rt.student_engines.urls) == [str(rt.weight_version)] == ["4"]
    finally:
        rt.close()
    fault_report.append({"case": "student engine (only one) SIGKILLed mid-rollout",
                         "outcome": "step finished; engine restarted from weights v1; its requests re-sent; "
                                    "0 lost/duplicated",
                         "baseline_s": baseline_s, "fault_s": student_s, "seconds_lost": student_s - baseline_s})
    fault_report.append({"case": "student engine's Ray actor process SIGKILLed mid-rollout",
                         "outcome": "Ray restarted the actor; server back on the same URL with weights v3; "
                                    "step finished; 0 lost/duplicated",
                         "baseline_s": baseline_s, "fault_s": actor_s, "seconds_lost": actor_s - baseline_s})
    fault_report.append({"case": "teacher replica (only one) SIGKILLed before scoring",
                         "outcome": "step finished; replica restarted; same scores; 0 lost/duplicated",
                         "baseline_s": baseline_s, "fault_s": teacher_s, "seconds_lost": teacher_s - baseline_s})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_rank_killed_mid_step_stops_clearly_and_resume_continues_exactly(toy_dir, tmp_path,
                                                                                  fault_report):
    run_dir = tmp_path / "run"
    steps = 4
    job, cfg = _job(run_dir, toy_dir, f"num_steps={steps}", "save_interval=1")
    killed: dict[str, Any] = {}

    def kill_trainer_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        pids: list[int] = []
        while not pids and time.monotonic() < deadline:  # the rank's process, found before it is needed
            pids = descendant_pids("TrainerActor")
            time.sleep(0.1)
        marker = run_dir / "checkpoints" / "step_1" / "driver.json"  # step 0 done and saved: step 1 starts
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        killed["pids"], killed["at"] = pids, time.perf_counter()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_trainer_after_the_first_checkpoint, daemon=True)
    killer.start()
    start = time.perf_counter()
    with pytest.raises(Exception) as info:
        train_lib.run(job, cfg)
    failed_at = time.perf_counter()
    killer.join(5)
    assert killed.get("pids"), "no trainer rank found to kill"
    message = f"{type(info.value).__name__}: {info.value}"
    assert "TrainerActor" in message and "died" in message and "resume=true" in message, message[:2000]
    done_before = [m["step"] for m in _metrics(run_dir)]
    assert done_before == list(range(len(done_before))) and 1 <= len(done_before) < steps

    resume_job, resume_cfg = _job(run_dir, toy_dir, f"num_steps={steps}", "save_interval=1", "resume=true")
    resumed_at = time.perf_counter()
    train_lib.run(resume_job, resume_cfg)
    done = time.perf_counter()
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(steps))  # no step skipped or repeated
    positions: Counter = Counter()
    for step in range(steps):
        rows = [json.loads(line) for line in (run_dir / "samples" / f"step_{step}.jsonl").read_text().splitlines()]
        positions.update(r["prompt_index"] for r in rows)
    assert sorted(positions) == list(range(steps * PROMPTS)) and set(positions.values()) == {PER_PROMPT}
    assert metrics[-1]["rollout/weight_version"] == steps
    step_s = float(np.mean([m["time/step_s"] for m in metrics]))
    redone = steps - len(done_before)
    lost = (failed_at - killed["at"]) + (done - resumed_at) - redone * step_s
    fault_report.append({
        "case": "trainer rank SIGKILLed mid-step (run stops, then resume=true)",
        "outcome": f"run stopped {failed_at - killed['at']:.1f}s after the kill with {type(info.value).__name__} "
                   f"naming TrainerActor; resume from checkpoint step_{len(done_before)}: steps 0-{steps - 1} "
                   "logged once, every prompt once",
        "baseline_s": step_s, "fault_s": step_s + lost, "seconds_lost": lost,
        "note": f"lost = time to fail + resume (start-up {done - resumed_at:.0f}s incl. {redone} steps) - "
                f"those steps' normal time; first run {failed_at - start:.0f}s"})


def test_toolbox_worker_and_sandbox_killed_mid_episode(fault_report):
    from envs.sandbox.local import sweep_stale
    from envs.swe.task import builtin_tasks
    from toolbox.manager import ToolManager
    from envs.tool_parsing import ToolCall
    from toolbox.toolbox import get_or_create_toolbox

    task = {t.instance_id: t for t in builtin_tasks()}["inflection__potatoes"]
    edit = ToolCall("str_replace", {"path": "inflection/__init__.py", "old": "(buffal|tomat)o$",
                                    "new": "(buffal|potat|tomat)o$"})
    episodes = 4
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="mopd-faults")
    try:
        toolbox = get_or_create_toolbox({"swe": {"workers": 2, "warm_per_worker": 1, "command_timeout": 30}})
        ray.get(toolbox.prewarm.remote())

        async def episode(tm: ToolManager, i: int, opened: dict[int, str]) -> tuple[int, str, float, int]:
            sid, _ = await tm.start("swe", task)
            await tm.step(sid, edit)
            opened[i] = sid
            r = await tm.step(sid, ToolCall("bash", {"command": "sleep 1.5; grep -c potat inflection/__init__.py"}))
            assert r.observation.startswith("1"), r  # the edit survived the fault (history replayed)
            reward = await tm.reward_async(sid)
            await tm.close(sid)
            return i, sid, reward, int(r.info.get("attempts", 1))

        async def run(fault: bool) -> tuple[list, float, dict[str, str]]:
            tm = ToolManager(toolbox, call_timeout_s=60)
            opened: dict[int, str] = {}
            start = time.perf_counter()
            tasks = [asyncio.ensure_future(episode(tm, i, opened)) for i in range(episodes)]
            victims: dict[str, str] = {}
            if fault:
                while len(opened) < episodes:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.5)  # every episode is inside its `sleep 1.5` call now
                workers = {i: await toolbox.session_worker.remote(sid) for i, sid in opened.items()}
                victim_worker = workers[0]
                other = next((i for i in opened if workers[i] != victim_worker), None)
                if other is not None:  # a sandbox on the surviving worker dies on its own
                    await workers[other].kill_sandbox.remote(opened[other])
                    victims["sandbox"] = opened[other]
                ray.kill(victim_worker)  # a whole toolbox worker, with the sandboxes it owned
                victims["worker_of"] = opened[0]
            results = await asyncio.gather(*tasks)
            return results, time.perf_counter() - start, victims

        baseline, baseline_s, _ = asyncio.run(run(False))
        faulted, fault_s, victims = asyncio.run(run(True))
        for results in (baseline, faulted):
            assert sorted(i for i, *_ in results) == list(range(episodes))  # each episode returned once
            assert len({sid for _, sid, *_ in results}) == episodes
            assert [reward for _, _, reward, _ in results] == [1.0] * episodes
        retried = sum(attempts > 1 for *_, attempts in faulted)
        assert retried >= 1 + ("sandbox" in victims), (faulted, victims)
        assert ray.get(toolbox.stats.remote())["replaced_workers"] >= 1
        ray.get(toolbox.shutdown.remote())
    finally:
        ray.shutdown()
        sweep_stale()
    lost = fault_s - baseline_s
    fault_report.append({"case": "toolbox worker actor killed mid-call (4 concurrent episodes)",
                         "outcome": f"worker replaced; its sessions replayed on new sandboxes; {retried} call(s) "
                                    f"retried; 4/4 episodes reward 1.0, each once",
                         "baseline_s": baseline_s, "fault_s": fault_s, "seconds_lost": lost})
    if "sandbox" in victims:
        fault_report.append({"case": "sandbox killed mid-call (same run, other worker)",
                             "outcome": "sandbox recreated, history replayed, call retried; episode reward 1.0",
                             "baseline_s": baseline_s, "fault_s": fault_s, "seconds_lost": lost,
                             "note": "same timed run as the worker kill"})

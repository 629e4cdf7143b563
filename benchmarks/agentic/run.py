"""Agentic episodes on the agentic dry-run world: prefix cache on vs off, tool latency, tools vs generation.

    python benchmarks/agentic/run.py --toy-dir outputs/agentic_bench/toy --rounds 3 --episodes 8 --turns 4,8
    python benchmarks/agentic/run.py --quick --out /tmp/agentic.json   # < 2 min once the toy world exists

The world is `experiment=agentic_dry_run`'s (built once under `--toy-dir` by mopd/toy/world.py, or an
existing run's toy dir). The policy is the toy world's `tool` teacher served by a local engine started
with rollout/engines.py (R3 on), greedy, so that episodes use the tool. Episodes run through the real
path: RolloutManager(agent_loops=...) -> ToolLoop (rollout/agent_loop.py) -> ToolboxSessions
(toolbox/session.py) -> ToolManager -> Toolbox (Ray actor pools) -> local sandboxes, with sandboxes
pre-warmed before each round as mopd/train.py does. Two scenarios:

- `dry_run`: the dry run's tool domain as configured (env.max_turns, env.max_new_tokens and
  rollout.max_context_len of the experiment): the teacher calls `bash` once and answers (2 turns).
- `keep_asking_<N>`: the same prompts, but every answer is followed by a new question (a fresh
  toy_tool session through the Toolbox on another task of the data), so each episode runs exactly N
  model turns (ToolLoop max_turns=N, context 1024).

Each round plays the same samples with the prefix cache on and off (two RolloutManagers on the same
engine; the mode that goes first alternates per round), and the two modes' samples are compared
token for token. Per episode the script times `llm.generate` and `env.step` (the agent loop's view
of the whole tool path) and the rest (session open/reset/close, rendering).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_module

from envs.base import StepResult
from mopd.agentic import AgenticEpisodes, episode_task
from mopd.config import JobConfig, register_configs, to_job_config
from mopd.core.types import Sample
from mopd.job import prepare
from rollout.agent_loop import Episode, ToolLoop
from rollout.chat_render import ObservationRenderer
from rollout.engines import launch_engines
from rollout.rollout_manager import RolloutManager
from rollout.trajectory import Trajectory
from toolbox.manager import percentile
from toolbox.session import ToolboxSession

POLICY_CONTEXT = 1024  # the toy models' position table; keep-asking episodes need more than the dry run's 256


class TimedSession:
    """An EnvSession that times every `step` (the whole path below the agent loop) into `clock`."""

    def __init__(self, inner: Any, clock: dict[str, Any]) -> None:
        self.inner, self.clock = inner, clock

    async def reset(self) -> str:
        return await self.inner.reset()

    async def step(self, model_text: str) -> StepResult:
        t0 = time.perf_counter()
        result = await self.inner.step(model_text)
        seconds = time.perf_counter() - t0
        self.clock["tool_s"] += seconds
        key = "tool_call_latency_s" if "tool" in result.info else "answer_latency_s"
        self.clock[key].append(seconds)
        return result

    async def close(self) -> None:
        await self.inner.close()


class KeepAsking:
    """An EnvSession that never ends: after each answer, a new question in a fresh toy_tool session on the
    next of `tasks` (through the same ToolboxSessions). Rewards of the answered questions go to `rewards`."""

    def __init__(self, agentic: AgenticEpisodes, first: ToolboxSession, tasks: list[Any], rewards: list[float]
                 ) -> None:
        self.agentic, self.current, self.tasks, self.rewards = agentic, first, list(tasks), rewards

    async def reset(self) -> str:
        return await self.current.reset()

    async def step(self, model_text: str) -> StepResult:
        result = await self.current.step(model_text)
        if not result.done:
            return result
        self.rewards.append(float(result.reward))
        await self.current.close()
        self.current = await self.agentic.sessions.open(self.agentic.kind, self.tasks.pop(0))
        return StepResult(await self.current.reset(), 0.0, False, dict(result.info, answered=True))

    async def close(self) -> None:
        await self.current.close()


class TimedLoop:
    """The tool loop with each model turn timed: wraps this trajectory's `generate` (instance attribute)."""

    multi_turn = True

    def __init__(self, inner: ToolLoop) -> None:
        self.inner = inner

    async def run(self, sample: Sample, llm: Trajectory) -> None:
        clock = sample.metadata["bench"]
        generate = llm.generate

        async def timed_generate(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await generate(*args, **kwargs)
            finally:
                clock["generate_s"] += time.perf_counter() - t0

        llm.generate = timed_generate  # type: ignore[method-assign]
        t0 = time.perf_counter()
        await self.inner.run(sample, llm)
        clock["episode_s"] = time.perf_counter() - t0


def new_clock() -> dict[str, Any]:
    """One episode's timers and latencies, kept in its sample's metadata (`bench`)."""
    return {"generate_s": 0.0, "tool_s": 0.0, "episode_s": 0.0, "tool_call_latency_s": [], "answer_latency_s": [],
            "rewards": []}


def make_loop(agentic: AgenticEpisodes, job: JobConfig, task_pool: list[Any], keep_asking: int | None) -> TimedLoop:
    """The dry run's tool loop (keep_asking None) or one whose episodes run `keep_asking` model turns."""

    async def open_episode(sample: Sample) -> Episode:
        clock = sample.metadata["bench"]
        session = await agentic.sessions.open(agentic.kind, episode_task(sample))
        env: Any = session
        if keep_asking is not None:
            rng = random.Random(sample.prompt_index)  # the same follow-up questions in both modes
            env = KeepAsking(agentic, session, rng.sample(task_pool, keep_asking), clock["rewards"])
        return Episode(env=TimedSession(env, clock), renderer=lambda first: ObservationRenderer(
            agentic.tokenizer, [{"role": "user", "content": first}], tools=agentic.tools))

    if keep_asking is None:
        loop = ToolLoop(open_episode, max_turns=job.env.max_turns,
                        max_new_tokens=job.env.max_new_tokens or job.rollout.max_new_tokens,
                        max_context_len=job.rollout.max_context_len)
    else:
        loop = ToolLoop(open_episode, max_turns=keep_asking,
                        max_new_tokens=job.env.max_new_tokens or job.rollout.max_new_tokens,
                        max_context_len=POLICY_CONTEXT)
    return TimedLoop(loop)


def compose_job(toy_dir: Path, run_dir: Path) -> JobConfig:
    """The agentic dry run's job, greedy (token-for-token comparison of the two modes)."""
    register_configs()
    with initialize_config_module(config_module="configs", version_base=None):
        cfg = compose(config_name="config", overrides=[
            "experiment=agentic_dry_run", f"run_dir={run_dir}", f"toy.dir={toy_dir}", "rollout.temperature=0"])
    return to_job_config(cfg)


def start_ray(job: JobConfig) -> None:
    """An embedded cluster with the options mopd/job.py uses for a local job."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})


def compare(on: list[Sample], off: list[Sample]) -> dict[str, Any]:
    """Whether the cache changed anything but the prefill work: tokens, masks, logprobs, routing, rewards."""
    tokens = all(a.prompt_ids == b.prompt_ids and a.response_ids == b.response_ids and a.loss_mask == b.loss_mask
                 for a, b in zip(on, off, strict=True))
    diff = max((float(np.max(np.abs(np.subtract(a.rollout_logprobs, b.rollout_logprobs))))
                for a, b in zip(on, off) if a.response_ids == b.response_ids and a.rollout_logprobs), default=0.0)
    routing = all(a.routed_experts is None and b.routed_experts is None
                  or a.routed_experts is not None and b.routed_experts is not None
                  and np.array_equal(a.routed_experts, b.routed_experts) for a, b in zip(on, off))
    rewards = all(a.reward == b.reward and a.metadata["bench"]["rewards"] == b.metadata["bench"]["rewards"]
                  for a, b in zip(on, off))
    return {"tokens_identical": tokens, "logprob_max_abs_diff": diff, "routing_identical": routing,
            "rewards_identical": rewards}


def play(rollout: RolloutManager, agentic: AgenticEpisodes, samples: list[Sample]) -> dict[str, Any]:
    """One mode's round: pre-warm (as mopd/train.py does), then every episode at once through the manager."""
    for s in samples:
        s.metadata["bench"] = new_clock()
    t0 = time.perf_counter()
    agentic.prewarm(samples)
    t1 = time.perf_counter()
    asyncio.run(rollout.generate(samples))
    t2 = time.perf_counter()
    agentic.sessions.metrics()  # restart its counters; the script keeps its own per episode
    return {"prewarm_s": t1 - t0, "generate_s": t2 - t1, "samples": samples}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over rounds of one mode: episodes/s, prefill per episode, latency, time shares."""
    samples = [s for r in rounds for s in r["samples"]]
    clocks = [s.metadata["bench"] for s in samples]
    wall = sum(r["generate_s"] for r in rounds)
    episode = sum(c["episode_s"] for c in clocks)
    gen, tool = sum(c["generate_s"] for c in clocks), sum(c["tool_s"] for c in clocks)
    calls = [x for c in clocks for x in c["tool_call_latency_s"]]
    answers = [x for c in clocks for x in c["answer_latency_s"]]
    rewards = [s.reward for s in samples if s.metadata.get("env_reward")] + [x for c in clocks for x in c["rewards"]]
    return {
        "episodes": len(samples), "episodes_per_s": len(samples) / wall, "rollout_wall_s": wall,
        "prewarm_s": sum(r["prewarm_s"] for r in rounds),
        "turns_per_episode": float(np.mean([s.metadata.get("turns", 0) for s in samples])),
        "prefill_tokens_per_episode": float(np.mean([s.metadata["prefill_tokens"] for s in samples])),
        "cached_tokens_per_episode": float(np.mean([s.metadata["cached_tokens"] for s in samples])),
        "aborted": sum(s.finish_reason == "abort" for s in samples),
        "tool_calls": len(calls), "tool_call_p50_s": percentile(calls, 50), "tool_call_p99_s": percentile(calls, 99),
        "answer_steps": len(answers), "answer_step_p50_s": percentile(answers, 50),
        "answer_step_p99_s": percentile(answers, 99),
        "share_generate": gen / episode, "share_tools": tool / episode, "share_other": 1 - (gen + tool) / episode,
        "accuracy": float(np.mean(rewards)) if rewards else 0.0,
    }


def run_scenario(name: str, managers: dict[bool, RolloutManager], agentic: AgenticEpisodes,
                 batches: list[list[Sample]]) -> dict[str, Any]:
    """Both modes on the same samples, interleaved round by round (the first mode alternates)."""
    played: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    checks = []
    for i, batch in enumerate(batches):
        order = (True, False) if i % 2 == 0 else (False, True)
        for cache in order:
            played[cache].append(play(managers[cache], agentic, copy.deepcopy(batch)))
        checks.append(compare(played[True][-1]["samples"], played[False][-1]["samples"]))
    on, off = summarize(played[True]), summarize(played[False])
    return {"scenario": name, "cache_on": on, "cache_off": off,
            "prefill_ratio_off_on": off["prefill_tokens_per_episode"] / max(on["prefill_tokens_per_episode"], 1e-9),
            "episodes_per_s_ratio_on_off": on["episodes_per_s"] / off["episodes_per_s"],
            "tokens_identical": all(c["tokens_identical"] for c in checks),
            "routing_identical": all(c["routing_identical"] for c in checks),
            "rewards_identical": all(c["rewards_identical"] for c in checks),
            "logprob_max_abs_diff": max(c["logprob_max_abs_diff"] for c in checks)}


def table(results: list[dict[str, Any]]) -> str:
    """The README's markdown table and one line of ratios and identity checks per scenario."""
    head = ("| scenario | cache | turns/ep | episodes/s | prefill tok/ep | cached tok/ep | tool call p50/p99 ms | "
            "time: generate / tools / other | accuracy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        for cache in ("on", "off"):
            m = r[f"cache_{cache}"]
            lines.append(f"| {r['scenario']} | {cache} | {m['turns_per_episode']:.1f} | {m['episodes_per_s']:.2f} | "
                         f"{m['prefill_tokens_per_episode']:.0f} | {m['cached_tokens_per_episode']:.0f} | "
                         f"{1e3 * m['tool_call_p50_s']:.0f} / {1e3 * m['tool_call_p99_s']:.0f} | "
                         f"{m['share_generate']:.0%} / {m['share_tools']:.0%} / {m['share_other']:.0%} | "
                         f"{m['accuracy']:.2f} |")
    lines.append("")
    for r in results:
        lines.append(f"{r['scenario']}: prefill tokens off/on {r['prefill_ratio_off_on']:.2f}x, episodes/s on/off "
                     f"{r['episodes_per_s_ratio_on_off']:.2f}x, tokens identical {r['tokens_identical']}, routing "
                     f"identical {r['routing_identical']}, rewards identical {r['rewards_identical']}, "
                     f"logprob max |diff| {r['logprob_max_abs_diff']:.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy-dir", default="outputs/agentic_bench/toy", help="toy world (built when missing)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario")
    parser.add_argument("--episodes", type=int, default=8, help="episodes per round (distinct prompts)")
    parser.add_argument("--turns", default="4,8", help="model turns of the keep-asking scenarios")
    parser.add_argument("--quick", action="store_true", help="1 round of 4 episodes, keep-asking 4 turns")
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/agentic/result.json)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.episodes, args.turns = 1, 4, "4"
    turns = [int(t) for t in args.turns.split(",")]
    if args.rounds < 1 or args.episodes < 1 or min(turns) < 2:
        parser.error("--rounds and --episodes must be >= 1, every --turns >= 2")
    out = Path(args.out) if args.out else Path(__file__).with_name("result.json")
    with tempfile.TemporaryDirectory() as tmp:
        job = compose_job(Path(args.toy_dir).resolve(), Path(tmp) / "run")
        tokenizer, data = prepare(job)  # builds the toy world under --toy-dir when it is missing
        results = measure(job, tokenizer, data, args.rounds, args.episodes, turns)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPUs, "
              f"{platform.machine()}, {platform.system()}", "args": vars(args), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out}")


def measure(job: JobConfig, tokenizer: Any, data: Any, rounds: int, episodes: int, turns: list[int]
            ) -> list[dict[str, Any]]:
    """Start Ray, the policy's engine and the Toolbox; play every scenario; shut everything down."""
    import ray

    start_ray(job)
    engines = None
    agentic = None
    try:
        policy = job.teachers["tool"].model_path
        engine_cfg = dataclasses.replace(job.rollout, max_context_len=POLICY_CONTEXT)
        engines = launch_engines(policy, engine_cfg, name="policy", routing_replay=True)
        agentic = AgenticEpisodes(job, tokenizer)
        batches = [[s for s in data.make_samples(2 * episodes, 1) if s.domain == "tool"][:episodes]
                   for _ in range(rounds)]
        task_pool = [row.metadata["task"] for row in data.rows if row.domain == "tool"]
        results = []
        for name, keep_asking in [("dry_run", None)] + [(f"keep_asking_{n}", n) for n in turns]:
            loop = make_loop(agentic, job, task_pool, keep_asking)
            managers = {cache: RolloutManager(list(engines.urls), dataclasses.replace(engine_cfg, prefix_cache=cache),
                                              eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer,
                                              model_path=policy, engines=engines, agent_loops={"tool": loop})
                        for cache in (True, False)}
            results.append(run_scenario(name, managers, agentic, batches))
        return results
    finally:
        if agentic is not None:
            agentic.close()
        if engines is not None:
            engines.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

"""Agentic episodes in `mopd-train`: which domains run the tool loop, and the Toolbox behind them.

The domains listed by `env.domains` (default: the domain named like `env.kind`) are played as
multi-turn episodes by the `tool` agent loop (rollout/agent_loop.py): each sample opens a session of
`env.kind` on the task its data row carries (`task`, or the label), through the ToolManager -> Toolbox
(Ray actor pools) -> sandboxes (local or Kubernetes, `env.sandbox.backend`). The prompt the engines
see is the chat template over the environment's first observation (the question) with the kind's
tool schemas, rendered by rollout/chat_render.py, which also renders every observation: tokens in,
tokens out. Every other domain stays single-turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from envs.registry import env_kind
from mopd.config import JobConfig
from mopd.core.types import Sample
from rollout.agent_loop import AgentLoop, Episode, ToolLoop
from rollout.chat_render import ObservationRenderer
from toolbox.manager import ToolManager
from toolbox.session import ToolboxSessions
from toolbox.toolbox import get_or_create_toolbox
from toolbox.worker import task_snapshot


def tool_specs(kind: str) -> list[dict[str, Any]]:
    """The kind's tool schemas in the chat-template (OpenAI function) form, for the system prompt."""
    specs = []
    for name, schema in env_kind(kind).tools.items():
        parameters = {"type": "object", "properties": schema.get("properties", {}),
                      "required": list(schema.get("required", []))}
        specs.append({"type": "function", "function": {"name": name, "description": schema.get("description", ""),
                                                       "parameters": parameters}})
    return specs


def episode_task(sample: Sample) -> Any:
    """The task a sample's data row carries: its `task` field, else its label."""
    return sample.metadata.get("task", sample.label)


class AgenticEpisodes:
    """The job's multi-turn side: the Toolbox pools of `env.kind`, their sessions, and the tool loop."""

    def __init__(self, job: JobConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        env = job.env
        self.env = env
        self.kind = env.kind
        self.domains = env.episode_domains
        self.tokenizer = tokenizer
        self.tools = tool_specs(env.kind)
        pools = {env.kind: {"workers": env.workers, "warm_per_worker": 0, "max_turns": env.max_turns,
                            "command_timeout": env.sandbox.wall_timeout_s,
                            "sandbox": dataclasses.asdict(env.sandbox)}}
        self.toolbox = get_or_create_toolbox(pools)
        self.sessions = ToolboxSessions(ToolManager(self.toolbox, call_timeout_s=env.sandbox.wall_timeout_s + 30))
        self.loop = ToolLoop(self.open_episode, max_turns=env.max_turns,
                             max_new_tokens=env.max_new_tokens or job.rollout.max_new_tokens,
                             max_context_len=job.rollout.max_context_len)

    def agent_loops(self) -> dict[str, AgentLoop]:
        """Domain -> loop, for RolloutManager(agent_loops=...); unlisted domains are single-turn."""
        return {domain: self.loop for domain in self.domains}

    async def open_episode(self, sample: Sample) -> Episode:
        session = await self.sessions.open(self.kind, episode_task(sample))
        return Episode(env=session, renderer=self._renderer)

    def _renderer(self, first_observation: str) -> ObservationRenderer:
        messages = [{"role": "user", "content": first_observation}]
        return ObservationRenderer(self.tokenizer, messages, tools=self.tools)

    def prewarm(self, samples: list[Sample]) -> None:
        """Ready a sandbox for each of this step's episodes before generation starts: one already holding
        its task's files where the task has a snapshot (SWE; local sandboxes), else an empty one."""
        plain = 0
        by_task: dict[str, tuple[Any, int]] = {}
        for sample in samples:
            if sample.domain not in self.domains:
                continue
            task = episode_task(sample)
            if self.env.sandbox.backend == "local" and task_snapshot(env_kind(self.kind).load_task(task)):
                key = json.dumps(task, sort_keys=True, default=str)
                by_task[key] = (task, by_task.get(key, (task, 0))[1] + 1)
            else:
                plain += 1

        async def run() -> None:
            calls = [self.sessions.prewarm(self.kind, n, task) for task, n in by_task.values()]
            if plain:
                calls.append(self.sessions.prewarm(self.kind, plain))
            await asyncio.gather(*calls)

        if plain or by_task:
            asyncio.run(run())

    def metrics(self, samples: list[Sample]) -> dict[str, float]:
        """Per-step agent metrics: turns per episode, tool calls, errors and latency through the whole path."""
        episodes = [s for s in samples if s.domain in self.domains]
        out = self.sessions.metrics()
        if episodes:
            out["agent/turns"] = sum(s.metadata.get("turns", 0) for s in episodes) / len(episodes)
            out["agent/episodes"] = float(len(episodes))
            out["agent/aborted"] = float(sum(s.finish_reason == "abort" for s in episodes))
            # graded by the environment (the rest were cut by max_turns or the context, or aborted: reward 0)
            out["agent/env_graded"] = sum(bool(s.metadata.get("env_reward")) for s in episodes) / len(episodes)
        return out

    def close(self) -> None:
        import ray

        ray.get(self.toolbox.shutdown.remote())
        ray.kill(self.toolbox)

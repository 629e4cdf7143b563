"""The rollout manager: turns prompt-only Samples into trajectories on the student engines.

Every sample is its own coroutine running its domain's agent loop (rollout/agent_loop.py; single-turn
unless `agent_loops` names one for the domain) and every model turn its own request (no micro-batches), so the engines' own batching
decides throughput and a slow sequence never holds up others. Multi-turn loops use the request-level
prefix cache unless `rollout.prefix_cache=false`. Each call opens its own HTTP sessions, so the sync
driver can call it with `asyncio.run` step after step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from mopd.core.model_shape import read_model_shape
from mopd.core.types import Sample
from rollout.agent_loop import AgentLoop, SingleTurnLoop
from rollout.config import RolloutConfig
from rollout.dispatch import Dispatcher, Gate
from rollout.engine_client import EngineClient
from rollout.sglang_api import GenerateRequest
from rollout.trajectory import Trajectory

SAMPLE_OVERRIDES = ("max_new_tokens", "ignore_eos")  # what a Sample's metadata["sampling_params"] may set


class RolloutManager:
    def __init__(self, urls: list[str], cfg: RolloutConfig, *, eos_token_id: int | None,
                 tokenizer: PreTrainedTokenizerBase | None = None, model_path: str | None = None,
                 engines: Any = None, agent_loops: Mapping[str, AgentLoop] | None = None) -> None:
        self.urls = list(urls)
        self.cfg = cfg
        self.eos_token_id = eos_token_id
        self.tokenizer = tokenizer
        self.engines = engines  # EngineGroup, to restart dead servers between steps
        shape = read_model_shape(model_path) if model_path else None
        self.num_layers, self.top_k = (shape.num_layers, shape.top_k) if shape else (0, 0)
        self.routing_replay = cfg.routing_replay and self.top_k > 0
        self.agent_loops = dict(agent_loops or {})  # domain -> loop; other domains are single-turn
        self.single_turn = SingleTurnLoop()

    def sampling_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature,
                                  "top_p": self.cfg.top_p, "top_k": self.cfg.top_k, "skip_special_tokens": False,
                                  "no_stop_trim": True}
        if self.eos_token_id is not None:
            params["stop_token_ids"] = [self.eos_token_id]
        return params

    def sample_params(self, sample: Sample) -> dict[str, Any]:
        """The sampling parameters of one sample: rollout's, with the sample's own `metadata["sampling_params"]`
        merged in (a shorter max_new_tokens or ignore_eos, e.g. a benchmark's heavy-tailed lengths)."""
        params = self.sampling_params()
        overrides = sample.metadata.get("sampling_params")
        if overrides is None:
            return params
        where = f'sample {sample.prompt_index}: metadata["sampling_params"]'
        if not isinstance(overrides, dict):
            raise TypeError(f"{where}: expected a dict, got {type(overrides).__name__}")
        unknown = sorted(set(overrides) - set(SAMPLE_OVERRIDES))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(SAMPLE_OVERRIDES)}")
        if "max_new_tokens" in overrides:
            value = overrides["max_new_tokens"]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.cfg.max_new_tokens:
                raise ValueError(f"{where}.max_new_tokens: expected an integer in [1, rollout.max_new_tokens="
                                 f"{self.cfg.max_new_tokens}], got {value!r}")
        if "ignore_eos" in overrides and not isinstance(overrides["ignore_eos"], bool):
            raise ValueError(f"{where}.ignore_eos: expected true or false, got {overrides['ignore_eos']!r}")
        return {**params, **overrides}

    def dispatcher(self) -> Dispatcher:
        """Bounded failover: rollout.max_retries re-sends per request, within rollout.startup_timeout_s (long
        enough for a dead engine to be restarted by its actor) of the first fault."""
        return Dispatcher(self.urls, timeout_s=self.cfg.request_timeout_s, max_retries=self.cfg.max_retries,
                          retry_window_s=self.cfg.startup_timeout_s, num_layers=self.num_layers, top_k=self.top_k)

    async def check_engines(self) -> None:
        """Fail at start-up, not mid-run, when R3 is on but an engine returns no routed experts."""
        if not self.routing_replay:
            return
        for url in self.urls:
            async with EngineClient(url, num_layers=self.num_layers, top_k=self.top_k) as client:
                probe = GenerateRequest(input_ids=[self.eos_token_id or 0, 1], return_routed_experts=True,
                                        sampling_params={"max_new_tokens": 1, "temperature": 0.0})
                resp = await client.generate(probe)
                if resp.routed_experts is None:
                    raise RuntimeError(
                        f"engine {url} returned no routed experts while rollout.routing_replay=true: start SGLang "
                        "with --enable-return-routed-experts, or set rollout.routing_replay=false")

    async def generate(self, samples: list[Sample]) -> list[Sample]:
        """Fill each sample's response fields; the samples are returned in the same order."""
        if self.engines is not None:
            await asyncio.to_thread(self.engines.ensure_alive)
        dispatcher = self.dispatcher()
        try:
            await asyncio.gather(*(self._generate_one(dispatcher, s) for s in samples))
        finally:
            await dispatcher.close()
        return samples

    async def _generate_one(self, dispatcher: Dispatcher, sample: Sample) -> None:
        await self.run_sample(self.trajectory(dispatcher, sample))

    def loop_of(self, sample: Sample) -> AgentLoop:
        return self.agent_loops.get(sample.domain, self.single_turn)

    def trajectory(self, dispatcher: Dispatcher, sample: Sample, *, gate: Gate | None = None,
                   resume: bool = False) -> Trajectory:
        """The trajectory one sample is generated through (see rollout/trajectory.py for `gate` and `resume`)."""
        # a single turn has nothing to reuse between requests: no engine session for it
        return Trajectory(dispatcher, sample, self.sample_params(sample),
                          prefix_cache=self.cfg.prefix_cache and self.loop_of(sample).multi_turn,
                          routing_replay=self.routing_replay, gate=gate, resume=resume)

    async def run_sample(self, trajectory: Trajectory) -> Sample:
        """Run one sequence (a single-turn sample or an agent episode) to its end: what the batch path does
        per sample and the sequence scheduler (rollout/scheduler.py) does per submitted sequence."""
        try:
            await self.loop_of(trajectory.sample).run(trajectory.sample, trajectory)
            return trajectory.to_sample(self.tokenizer)
        finally:
            await trajectory.close()

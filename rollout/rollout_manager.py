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
from rollout.dispatch import Dispatcher
from rollout.engine_client import EngineClient
from rollout.sglang_api import GenerateRequest
from rollout.trajectory import Trajectory


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
        loop = self.agent_loops.get(sample.domain, self.single_turn)
        # a single turn has nothing to reuse between requests: no engine session for it
        trajectory = Trajectory(dispatcher, sample, self.sampling_params(),
                                prefix_cache=self.cfg.prefix_cache and loop.multi_turn,
                                routing_replay=self.routing_replay)
        try:
            await loop.run(sample, trajectory)
            trajectory.to_sample(self.tokenizer)
        finally:
            await trajectory.close()

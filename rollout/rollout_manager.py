"""The rollout manager: turns prompt-only Samples into trajectories on the student engines.

Every sequence is its own request (no micro-batches), so the engines' own batching decides
throughput and a slow sequence never holds up others. Each call opens its own HTTP sessions, so
the sync driver can call it with `asyncio.run` step after step.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

from transformers import AutoConfig, PreTrainedTokenizerBase

from mopd.core.types import Sample
from rollout import speculative
from rollout.config import RolloutConfig
from rollout.dispatch import Dispatcher
from rollout.engine_client import EngineClient
from rollout.sglang_api import GenerateRequest, GenerateResponse


def routing_shape(model_path: str) -> tuple[int, int]:
    """(num_hidden_layers, top_k) of a checkpoint; top_k is 0 for dense models (nothing to replay)."""
    config = AutoConfig.from_pretrained(model_path)
    return int(config.num_hidden_layers), int(getattr(config, "num_experts_per_tok", 0) or 0)


class RolloutManager:
    def __init__(self, urls: list[str], cfg: RolloutConfig, *, eos_token_id: int | None,
                 tokenizer: PreTrainedTokenizerBase | None = None, model_path: str | None = None,
                 engines: Any = None) -> None:
        self.urls = list(urls)
        self.cfg = cfg
        self.eos_token_id = eos_token_id
        self.tokenizer = tokenizer
        self.engines = engines  # EngineGroup, to restart dead servers between steps
        self.num_layers, self.top_k = routing_shape(model_path) if model_path else (0, 0)
        self.routing_replay = cfg.routing_replay and self.top_k > 0
        self._live: Dispatcher | None = None
        self.failovers = 0  # requests re-sent to another engine because theirs failed (cumulative)

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
        self._live = dispatcher
        try:
            await asyncio.gather(*(self._generate_one(dispatcher, s) for s in samples))
        finally:
            self._live = None
            self.failovers += dispatcher.failovers
            await dispatcher.close()
        return samples

    async def _generate_one(self, dispatcher: Dispatcher, sample: Sample) -> None:
        request = GenerateRequest(input_ids=sample.prompt_ids, sampling_params=self.sampling_params(),
                                  return_logprob=True, logprob_start_len=-1,
                                  return_routed_experts=self.routing_replay)
        # a fresh rid per attempt: a retry may reach an engine where the first attempt is still in flight,
        # and SGLang refuses a duplicate request ID with a 400 (which is not retried)
        response = await dispatcher.run(lambda client: client.generate(replace(request, rid=uuid.uuid4().hex)))
        fill_sample(sample, response, self.tokenizer)

    async def abort_all(self) -> None:
        """End every in-flight request now (step boundary); each returns what it generated so far."""
        async def one(url: str) -> None:
            async with EngineClient(url) as client:
                await client.abort()

        await asyncio.gather(*(one(u) for u in self.urls))

    async def update_weights_from_disk(self, path: str, version: int) -> None:
        async def one(url: str) -> None:
            async with EngineClient(url, timeout_s=self.cfg.request_timeout_s) as client:
                await client.update_weights_from_disk(path, version)

        await asyncio.gather(*(one(u) for u in self.urls))


def fill_sample(sample: Sample, response: GenerateResponse, tokenizer: PreTrainedTokenizerBase | None) -> None:
    n = len(response.output_ids)
    sample.response_ids = list(response.output_ids)
    sample.loss_mask = [1] * n
    logprobs = response.output_logprobs or []
    if len(logprobs) != n:
        raise RuntimeError(f"engine returned {len(logprobs)} logprobs for {n} output tokens")
    sample.rollout_logprobs = [float(x) for x in logprobs]
    version = int(response.weight_version) if response.weight_version.isdigit() else 0
    sample.weight_versions = [version] * n
    sample.finish_reason = response.finish_reason
    sample.routed_experts = response.routed_experts
    sample.response_text = tokenizer.decode(sample.response_ids) if tokenizer is not None else response.text
    speculative.record(sample.metadata, response)
    sample.check()

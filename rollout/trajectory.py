"""A multi-turn trajectory with a request-level prefix cache.

The framework keeps every turn's tokens, logprobs and routed experts. With the cache on, a new
turn sends only the tokens added since the last request to the same engine's session (the engine
keeps the KV cache) and asks for routed experts only from where the cached rows end; the
assembled trajectory still carries complete logprobs and routing. With it off, every turn sends
the whole context (what an agent framework without a prefix cache does).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import numpy as np

from mopd.core.types import Sample
from rollout import speculative
from rollout.dispatch import Dispatcher
from rollout.engine_client import EngineClient, EngineError, _retryable
from rollout.sglang_api import GenerateRequest, GenerateResponse, SessionParams


class Trajectory:
    def __init__(self, dispatcher: Dispatcher, sample: Sample, sampling_params: dict[str, Any], *,
                 prefix_cache: bool = True, routing_replay: bool = False) -> None:
        self.dispatcher = dispatcher
        self.sample = sample
        self.sampling_params = dict(sampling_params)
        self.prefix_cache = prefix_cache
        self.routing_replay = routing_replay
        self.key = uuid.uuid4().hex  # sticky engine for this trajectory
        self.tokens: list[int] = list(sample.prompt_ids)
        self.sent = 0  # tokens of self.tokens the engine's session already holds (as context)
        self.rows: list[np.ndarray] = []  # routed-experts rows received so far, in order
        self.num_rows = 0
        self.session: tuple[int, str] | None = None  # (engine index, session id)
        self.last_rid: str | None = None
        self.prefill_tokens = 0  # tokens the engines had to compute (not served from a cache)
        self.requests = 0
        sample.response_ids, sample.loss_mask, sample.rollout_logprobs, sample.weight_versions = [], [], [], []

    async def generate(self) -> GenerateResponse:
        """Generate the next model turn from the current context and append it."""
        response = await self._request()
        out = list(response.output_ids)
        self.tokens += out
        self.sample.response_ids += out
        self.sample.loss_mask += [1] * len(out)
        self.sample.rollout_logprobs += [float(x) for x in (response.output_logprobs or [])]
        version = int(response.weight_version) if response.weight_version.isdigit() else 0
        self.sample.weight_versions += [version] * len(out)
        self.sample.finish_reason = response.finish_reason
        self.prefill_tokens += response.prompt_tokens - response.cached_tokens
        speculative.record(self.sample.metadata, response)  # turns add up
        if response.routed_experts is not None:
            self.rows.append(response.routed_experts)
            self.num_rows += len(response.routed_experts)
        return response

    def append_observation(self, tokens: list[int]) -> None:
        """Tool or environment output: part of the context, never trained on (loss mask 0)."""
        self.tokens += tokens
        self.sample.response_ids += tokens
        self.sample.loss_mask += [0] * len(tokens)
        self.sample.rollout_logprobs += [0.0] * len(tokens)
        self.sample.weight_versions += [self.sample.weight_versions[-1] if self.sample.weight_versions else 0] * len(tokens)

    async def _request(self) -> GenerateResponse:
        rid = uuid.uuid4().hex
        if self.prefix_cache:
            try:
                return await self._session_request(rid)
            except Exception as e:  # noqa: BLE001 - engine faults: fall back to a full request elsewhere
                if not _retryable(e):
                    raise
                self.session, self.sent = None, 0
                self.dispatcher.release(self.key)
        return await self._full_request(rid)

    async def _session_request(self, rid: str) -> GenerateResponse:
        if self.session is None:
            index = self.dispatcher.pick(self.key)
            sid = await self.dispatcher.clients[index].open_session()
            self.session, self.sent, self.last_rid = (index, sid), 0, None
        index, sid = self.session
        client: EngineClient = self.dispatcher.clients[index]
        request = GenerateRequest(
            input_ids=self.tokens[self.sent:], sampling_params=self.sampling_params, return_logprob=True,
            return_routed_experts=self.routing_replay, routed_experts_start_len=self.num_rows, rid=rid,
            session_params=SessionParams(id=sid, rid=self.last_rid))
        self.dispatcher.in_flight[index] += 1
        try:
            response = await client.generate(request, retries=0)
        finally:
            self.dispatcher.in_flight[index] -= 1
        self.last_rid = rid
        self.sent = len(self.tokens) + len(response.output_ids)
        self.requests += 1
        return response

    async def _full_request(self, rid: str) -> GenerateResponse:
        request = GenerateRequest(input_ids=list(self.tokens), sampling_params=self.sampling_params,
                                  return_logprob=True, return_routed_experts=self.routing_replay,
                                  routed_experts_start_len=self.num_rows)
        # the first attempt uses `rid`, each retry a fresh one: SGLang refuses a duplicate request ID in
        # flight (400), e.g. after a session request that timed out on the same engine
        rids = iter([rid])
        response = await self.dispatcher.run(
            lambda c: c.generate(replace(request, rid=next(rids, None) or uuid.uuid4().hex)), key=self.key)
        self.requests += 1
        return response

    def to_sample(self) -> Sample:
        """The sample with routing rows for every token but the last: [prompt + response - 1, L, K]."""
        if self.rows:
            experts = np.concatenate(self.rows, axis=0)
            expected = len(self.tokens) - 1
            if len(experts) < expected:  # the final observation was never fed to the model: no routing yet
                raise EngineError("trajectory", f"routing known for {len(experts)} of {expected} tokens; end a "
                                  "trajectory with a model turn, not an observation")
            self.sample.routed_experts = experts[:expected]
        self.sample.check()
        return self.sample

    async def close(self) -> None:
        if self.session is not None:
            index, sid = self.session
            try:
                await self.dispatcher.clients[index].close_session(sid)
            except EngineError:
                pass
            self.session = None
        self.dispatcher.release(self.key)

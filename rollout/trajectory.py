"""A trajectory (one sample, one or more model turns) with a request-level prefix cache.

Every model turn of every sample goes through here, single-turn included, so a sample is filled in
one way. The framework keeps every turn's tokens, logprobs and routed experts. With the cache on, a
new turn sends only the tokens added since the last request to the same engine's session (the engine
keeps the KV cache) and asks for routed experts only from where the cached rows end; the assembled
trajectory still carries complete logprobs and routing. With it off, every turn sends the whole
context (what an agent framework without a prefix cache does). When the session's engine fails, the
session is dropped and the whole context is resent to another engine (rollout/dispatch.py), so the
sample stays consistent: the tokens, logprobs and routing rows of earlier turns are kept as they were.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from mopd.core.types import Sample
from rollout import speculative
from rollout.dispatch import Dispatcher, EngineSession, SessionLost
from rollout.engine_client import EngineError
from rollout.sglang_api import GenerateRequest, GenerateResponse


class Trajectory:
    """The conversation so far (prompt, model turns, observations) and its requests to the engines."""

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
        self.session: EngineSession | None = None
        self.texts: list[str] = []  # the engine's text of each model turn
        self.prefill_tokens = 0  # tokens the engines had to compute (not served from a cache)
        self.cached_tokens = 0  # context tokens an engine served from its cache
        self.requests = 0
        self.sessions_lost = 0  # turns resent in full because the session's engine failed
        sample.response_ids, sample.loss_mask, sample.rollout_logprobs, sample.weight_versions = [], [], [], []
        sample.routed_experts = None

    async def generate(self, sampling_params: dict[str, Any] | None = None) -> GenerateResponse:
        """Generate the next model turn from the current context and append it (loss mask 1).

        `sampling_params` overrides the trajectory's for this turn only (e.g. a smaller max_new_tokens)."""
        params = self.sampling_params if sampling_params is None else {**self.sampling_params, **sampling_params}
        response = await self._request(params)
        out = list(response.output_ids)
        logprobs = response.output_logprobs or []
        if len(logprobs) != len(out):
            raise EngineError("trajectory", f"engine returned {len(logprobs)} logprobs for {len(out)} output tokens")
        self.tokens += out
        self.sample.response_ids += out
        self.sample.loss_mask += [1] * len(out)
        self.sample.rollout_logprobs += [float(x) for x in logprobs]
        version = int(response.weight_version) if response.weight_version.isdigit() else 0
        self.sample.weight_versions += [version] * len(out)
        self.sample.finish_reason = response.finish_reason
        self.texts.append(response.text)
        self.prefill_tokens += response.prompt_tokens - response.cached_tokens
        self.cached_tokens += response.cached_tokens
        speculative.record(self.sample.metadata, response)  # turns add up
        if response.routed_experts is not None:
            self.rows.append(response.routed_experts)
            self.num_rows += len(response.routed_experts)
        return response

    def append_observation(self, tokens: list[int]) -> None:
        """Tool or environment output: part of the context, never trained on (loss mask 0, logprob 0.0).

        Its routing rows arrive with the next model turn, which feeds these tokens to the engine."""
        self.tokens += tokens
        self.sample.response_ids += tokens
        self.sample.loss_mask += [0] * len(tokens)
        self.sample.rollout_logprobs += [0.0] * len(tokens)
        self.sample.weight_versions += [self.sample.weight_versions[-1] if self.sample.weight_versions else 0] * len(tokens)

    def reset_prompt(self, prompt_ids: list[int]) -> None:
        """Replace the prompt before the first turn (e.g. rendered from the environment's first observation)."""
        if self.sample.response_ids or self.requests:
            raise RuntimeError("Trajectory.reset_prompt: the conversation has already started")
        if not prompt_ids:
            raise ValueError("Trajectory.reset_prompt: prompt_ids is empty")
        self.sample.prompt_ids = list(prompt_ids)
        self.tokens = list(prompt_ids)

    def abort(self, reason: str) -> None:
        """The episode cannot finish: keep what it holds for inspection, but nothing of it is trained on.

        Trailing tokens without routing rows (an observation the model never read) are dropped, so a sample
        carrying routing stays [prompt + response - 1, L, K]."""
        if self.rows:
            keep = self.num_rows + 1 - len(self.sample.prompt_ids)  # response tokens whose routing is known
            for name in ("response_ids", "loss_mask", "rollout_logprobs", "weight_versions"):
                setattr(self.sample, name, getattr(self.sample, name)[:keep])
            self.tokens = self.tokens[:len(self.sample.prompt_ids) + keep]
        self.sample.loss_mask = [0] * len(self.sample.response_ids)
        self.sample.finish_reason = "abort"
        self.sample.metadata["abort_reason"] = reason

    async def _request(self, params: dict[str, Any]) -> GenerateResponse:
        rid = uuid.uuid4().hex
        if self.prefix_cache:
            try:
                return await self._session_request(rid, params)
            except SessionLost:
                self.session, self.sent = None, 0  # the KV cache died with the engine: resend everything
                self.sessions_lost += 1
        return await self._full_request(rid, params)

    async def _session_request(self, rid: str, params: dict[str, Any]) -> GenerateResponse:
        if self.session is None:
            self.session, self.sent = await self.dispatcher.open_session(self.key), 0
        request = GenerateRequest(
            input_ids=self.tokens[self.sent:], sampling_params=params, return_logprob=True,
            return_routed_experts=self.routing_replay, routed_experts_start_len=self.num_rows, rid=rid)
        response = await self.dispatcher.generate_in_session(self.session, request)
        self.sent = len(self.tokens) + len(response.output_ids)
        self.requests += 1
        return response

    async def _full_request(self, rid: str, params: dict[str, Any]) -> GenerateResponse:
        request = GenerateRequest(input_ids=list(self.tokens), sampling_params=params, return_logprob=True,
                                  return_routed_experts=self.routing_replay, routed_experts_start_len=self.num_rows,
                                  rid=rid)
        response = await self.dispatcher.generate(request, key=self.key)
        self.requests += 1
        return response

    def to_sample(self, tokenizer: PreTrainedTokenizerBase | None = None) -> Sample:
        """The sample with routing rows for every token but the last ([prompt + response - 1, L, K]) and its
        response text (decoded with `tokenizer`; without one, the engine's text of the model turns)."""
        if self.rows:
            experts = np.concatenate(self.rows, axis=0)
            expected = len(self.tokens) - 1
            if len(experts) < expected:  # the final observation was never fed to the model: no routing yet
                raise EngineError("trajectory", f"routing known for {len(experts)} of {expected} tokens; end a "
                                  "trajectory with a model turn, not an observation")
            self.sample.routed_experts = experts[:expected]
        self.sample.metadata["prefill_tokens"] = self.prefill_tokens  # what the conversation cost the engines
        self.sample.metadata["cached_tokens"] = self.cached_tokens
        self.sample.response_text = (tokenizer.decode(self.sample.response_ids) if tokenizer is not None
                                     else "".join(self.texts))
        self.sample.check()
        return self.sample

    async def close(self) -> None:
        """End the engine's session (if any) and forget the trajectory's engine."""
        if self.session is not None:
            await self.dispatcher.close_session(self.session)
            self.session = None
        self.dispatcher.release(self.key)

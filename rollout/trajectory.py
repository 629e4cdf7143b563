"""A trajectory (one sample, one or more model turns) with a request-level prefix cache.

Every model turn of every sample goes through here, single-turn included, so a sample is filled in
one way. The framework keeps every turn's tokens, logprobs and routed experts. With the cache on, a
new turn sends only the tokens added since the last request to the same engine's session (the engine
keeps the KV cache) and asks for routed experts only from where the cached rows end; the assembled
trajectory still carries complete logprobs and routing. With it off, every turn sends the whole
context (what an agent framework without a prefix cache does). When the session's engine fails, the
session is dropped and the whole context is resent to another engine (rollout/dispatch.py), so the
sample stays consistent: the tokens, logprobs and routing rows of earlier turns are kept as they were.

Preemption (partial rollout, rollout/scheduler.py): with a `Gate`, a turn whose request comes back aborted
because the gate was closed meanwhile (the scheduler aborted the requests in flight for a weight push) keeps its
partial tokens, logprobs, routing rows and their weight version; once the gate opens again the same turn
continues from that prefix with the rest of its max_new_tokens, so one model turn may span weight versions.
The engine session is dropped then (its KV cache was computed with the old weights) and the next request
resends the whole context.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from mopd.core.types import Sample
from rollout import speculative
from rollout.dispatch import Dispatcher, EngineSession, Gate, SessionLost
from rollout.engine_client import EngineError
from rollout.sglang_api import GenerateRequest, GenerateResponse


class Trajectory:
    """The conversation so far (prompt, model turns, observations) and its requests to the engines.

    `resume=True` keeps the sample's response fields (a single-turn sample preempted in an earlier run,
    restored from the scheduler's state): its turn continues with what is left of max_new_tokens."""

    def __init__(self, dispatcher: Dispatcher, sample: Sample, sampling_params: dict[str, Any], *,
                 prefix_cache: bool = True, routing_replay: bool = False, gate: Gate | None = None,
                 resume: bool = False) -> None:
        self.dispatcher = dispatcher
        self.sample = sample
        self.sampling_params = dict(sampling_params)
        self.prefix_cache = prefix_cache
        self.routing_replay = routing_replay
        self.gate = gate
        self.key = uuid.uuid4().hex  # sticky engine for this trajectory
        self.tokens: list[int] = list(sample.prompt_ids)
        self.sent = 0  # tokens of self.tokens the engine's session already holds (as context)
        self.rows: list[np.ndarray] = []  # routed-experts rows received so far, in order
        self.num_rows = 0
        self.carried = 0  # tokens of the current turn generated before a restart (resume=True)
        self.session: EngineSession | None = None
        self.texts: list[str] = []  # the engine's text of each model turn
        self.prefill_tokens = 0  # tokens the engines had to compute (not served from a cache)
        self.cached_tokens = 0  # context tokens an engine served from its cache
        self.requests = 0
        self.sessions_lost = 0  # turns resent in full because the session's engine failed
        if resume and sample.response_ids:
            sample.check()
            self.tokens += sample.response_ids
            self.carried = len(sample.response_ids)
            self.texts.append(sample.response_text)
            if sample.routed_experts is not None:
                self.rows, self.num_rows = [sample.routed_experts], len(sample.routed_experts)
            sample.routed_experts = None
            return
        sample.response_ids, sample.loss_mask, sample.rollout_logprobs, sample.weight_versions = [], [], [], []
        sample.routed_experts = None

    async def generate(self, sampling_params: dict[str, Any] | None = None) -> GenerateResponse:
        """Generate the next model turn from the current context and append it (loss mask 1).

        `sampling_params` overrides the trajectory's for this turn only (e.g. a smaller max_new_tokens).
        With a gate, a turn cut by a pause continues after it (module docstring); the answer then covers the
        whole turn (all its tokens, logprobs and routing rows; the last part's finish reason)."""
        params = self.sampling_params if sampling_params is None else {**self.sampling_params, **sampling_params}
        budget = int(params["max_new_tokens"]) - self.carried
        self.carried = 0
        parts: list[GenerateResponse] = []
        cut_by_pause = False
        while budget > 0:
            if self.gate is not None:
                await self.gate.wait()
            epoch = self.gate.epoch if self.gate is not None else 0
            response = await self._request({**params, "max_new_tokens": budget})
            self._append(response)
            parts.append(response)
            budget -= len(response.output_ids)
            cut_by_pause = (response.finish_reason == "abort" and self.gate is not None
                            and self.gate.epoch != epoch)
            if not cut_by_pause:
                break
            meta = self.sample.metadata  # paused for a weight push: continue from the prefix after it
            meta["preemptions"] = meta.get("preemptions", 0) + 1
            await self._drop_session()
        if cut_by_pause or not parts:
            self.sample.finish_reason = "length"  # the budget ran out exactly at a pause
        return _merge(parts, self.sample.finish_reason)

    def _append(self, response: GenerateResponse) -> None:
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

    async def _drop_session(self) -> None:
        """After a preempted request: the session's KV cache is stale; the next request resends everything."""
        if self.session is not None:
            await self.dispatcher.close_session(self.session)
            self.session, self.sent = None, 0

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

    def partial_state(self) -> Sample:
        """The sample as it stands mid-turn (a paused single-turn sample), routing rows included, for the
        scheduler's state; `Trajectory(..., resume=True)` continues it."""
        self.sample.routed_experts = np.concatenate(self.rows, axis=0) if self.rows else None
        self.sample.response_text = "".join(self.texts)
        return self.sample

    async def close(self) -> None:
        """End the engine's session (if any) and forget the trajectory's engine."""
        if self.session is not None:
            await self.dispatcher.close_session(self.session)
            self.session = None
        self.dispatcher.release(self.key)


def _merge(parts: list[GenerateResponse], finish_reason: str) -> GenerateResponse:
    """One answer for a turn sent in several requests (continued after pauses)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return GenerateResponse(text="", output_ids=[], finish_reason=finish_reason, prompt_tokens=0,
                                completion_tokens=0, cached_tokens=0, weight_version="", output_logprobs=[],
                                input_logprobs=None, routed_experts=None)
    rows = [p.routed_experts for p in parts if p.routed_experts is not None]
    return dataclasses.replace(
        parts[-1], text="".join(p.text for p in parts), output_ids=[t for p in parts for t in p.output_ids],
        finish_reason=finish_reason, completion_tokens=sum(len(p.output_ids) for p in parts),
        output_logprobs=[x for p in parts for x in (p.output_logprobs or [])],
        routed_experts=np.concatenate(rows, axis=0) if rows else None, prompt_tokens=parts[0].prompt_tokens,
        cached_tokens=sum(p.cached_tokens for p in parts))

"""Request state of the local HF server: a request, its sampling parameters, and the session contexts that
let a multi-turn agent's next turn start from the previous turn's cache."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rollout.hf_server_batch_kv import KV
from rollout.hf_server_validation import sampling_params


class EngineDead(RuntimeError):
    """The scheduler loop has stopped: the server cannot generate (HTTP 503)."""


@dataclass
class Context:
    """What a finished request leaves in its session: tokens, KV of tokens[:kv_len], routing rows."""
    tokens: list[int]
    prompt_len: int
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    kv_len: int
    routing: np.ndarray | None  # rows for tokens[:kv_len]
    hidden: torch.Tensor | None = None  # pre-norm hidden rows of the last positions before kv_len (MTP drafts)


@dataclass
class Session:
    capacity: int
    contexts: OrderedDict[str, Context] = field(default_factory=OrderedDict)

    def remember(self, rid: str, ctx: Context, max_contexts: int) -> None:
        """LRU: keep the most recent contexts and at most `capacity` tokens in all."""
        self.contexts[rid] = ctx
        self.contexts.move_to_end(rid)
        while len(self.contexts) > 1 and (len(self.contexts) > max_contexts or
                                          sum(len(c.tokens) for c in self.contexts.values()) > self.capacity):
            self.contexts.popitem(last=False)


@dataclass
class Sampling:
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_ids: set[int]
    ignore_eos: bool
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    no_stop_trim: bool
    generator: torch.Generator | None


@dataclass
class Request:
    rid: str
    tokens: list[int]  # full context so far: (session history +) prompt + sampled outputs
    prompt_len: int
    sampling: Sampling
    return_logprob: bool
    logprob_start_len: int
    return_routed_experts: bool
    routed_experts_start_len: int
    session_id: str | None
    top_logprobs_num: int = 0
    kv: KV | None = None  # positions [0, kv_len): a row of the last step's batch cache, or a session's
    kv_len: int = 0
    cached_tokens: int = 0
    routing: list[np.ndarray] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    aborted: bool = False
    future: asyncio.Future | None = None
    hidden: torch.Tensor | None = None  # MTP: pre-norm hidden of positions [kv_len - len, kv_len)
    spec_verify_ct: int = 0  # speculative decoding: decode forwards, drafts accepted / proposed
    spec_correct: int = 0
    spec_proposed: int = 0


def parse_sampling(params: dict[str, Any], eos_ids: set[int], vocab_size: int, max_new_limit: int) -> Sampling:
    """Check SGLang's sampling keys (see `hf_server_validation`) and build the request's Sampling."""
    return build_sampling(sampling_params(params, vocab_size=vocab_size, max_new_limit=max_new_limit), eos_ids)


def build_sampling(p: dict[str, Any], eos_ids: set[int]) -> Sampling:
    """A request's Sampling from parameters `hf_server_validation.sampling_params` has checked."""
    seed = p["sampling_seed"]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    # as SGLang (Req._check_token_based_finish): ignore_eos turns off every token stop, stop_token_ids included
    stop_ids = set() if p["ignore_eos"] else set(p["stop_token_ids"]) | eos_ids
    return Sampling(max_new_tokens=p["max_new_tokens"], min_new_tokens=p["min_new_tokens"],
                    temperature=p["temperature"], top_p=p["top_p"], top_k=p["top_k"], stop_ids=stop_ids,
                    ignore_eos=p["ignore_eos"], skip_special_tokens=p["skip_special_tokens"],
                    spaces_between_special_tokens=p["spaces_between_special_tokens"],
                    no_stop_trim=p["no_stop_trim"], generator=gen)

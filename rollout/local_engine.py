"""Request state, linear sessions and the batching scheduler of the local engine (see local_server)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rollout.local_model import LocalModel, SeqState
from rollout.sglang_api import (GenerateRequest, ProtocolError, encode_routed_experts, logprob_entries)

log = logging.getLogger(__name__)


@dataclass
class Active:
    """One /generate request in flight."""

    req: GenerateRequest
    seq: SeqState
    prompt_len: int
    cached_at_start: int
    feed: list[int]
    done: asyncio.Future
    generator: torch.Generator | None
    eos: set[int]
    output: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    session_id: str | None = None


class Engine:
    """Request state, sessions and the batching scheduler around one LocalModel."""

    def __init__(self, model: LocalModel, *, max_batch: int, max_context: int, routed_experts: bool) -> None:
        self.model, self.max_batch, self.max_context = model, max_batch, max_context
        self.routed_experts = routed_experts
        self.active: list[Active] = []
        self.sessions: dict[str, tuple[SeqState, str | None]] = {}  # id -> (state, last rid)
        self.weight_version = "0"
        self.paused = False
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()  # held by a forward step or a weight update
        self.eos = _eos_ids(model)
        self.tokenizer = _tokenizer(model.model_path)

    # ------------------------------------------------------------------ requests
    def submit(self, req: GenerateRequest) -> Active:
        params = req.sampling_params
        session_id = None
        if req.session_params is not None:
            session_id = req.session_params.id
            if session_id not in self.sessions:
                raise ProtocolError(f"session_params.id: unknown session {session_id!r} (call /open_session)")
            seq, last_rid = self.sessions[session_id]
            sp = req.session_params
            if sp.rid is None:
                seq.tokens, seq.pos_logprobs = [], []
                seq.drop_cache()
            elif sp.rid != last_rid:
                raise ProtocolError(f"session_params.rid: {sp.rid!r} is not the latest request of the session "
                                    f"({last_rid!r}); this server keeps linear sessions only")
            if sp.offset is not None:
                seq.truncate(int(sp.offset))
        else:
            seq = SeqState()
        if not seq.tokens and not req.input_ids:
            raise ProtocolError("input_ids: expected a non-empty prompt")
        prompt_len = len(seq.tokens) + len(req.input_ids)
        if prompt_len >= self.max_context:
            raise ProtocolError(f"input_ids: prompt of {prompt_len} tokens does not fit the context length "
                                f"{self.max_context} (--max-context-len)")
        cached = seq.cached
        seq.tokens = seq.tokens + list(req.input_ids)
        seq.pos_logprobs = seq.pos_logprobs + [None] * len(req.input_ids)
        temp = float(params.get("temperature", 1.0))
        if temp < 0:
            raise ProtocolError(f"sampling_params.temperature: expected >= 0, got {temp}")
        gen = None
        if params.get("sampling_seed") is not None:
            gen = torch.Generator().manual_seed(int(params["sampling_seed"]))
        eos = set() if params.get("ignore_eos") else set(self.eos)
        eos |= set(params.get("stop_token_ids") or [])
        act = Active(req=req, seq=seq, prompt_len=prompt_len, cached_at_start=cached, feed=seq.tokens[cached:],
                     done=asyncio.get_running_loop().create_future(), generator=gen, eos=eos, session_id=session_id)
        self.active.append(act)
        self.wake.set()
        return act

    def abort(self, rid: str | None) -> int:
        hit = [a for a in self.active if rid is None or a.req.rid == rid]
        for a in hit:
            a.finish = {"type": "abort", "message": "aborted by /abort_request"}
            self._complete(a)
        return len(hit)

    # ------------------------------------------------------------------ scheduler
    async def run(self) -> None:
        while True:
            if not self.active or self.paused:
                self.wake.clear()
                await self.wake.wait()
                continue
            async with self.lock:
                batch = self.active[: self.max_batch]
                try:
                    results = await asyncio.to_thread(self.model.step, [a.seq for a in batch],
                                                      [a.feed for a in batch])
                except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                    log.exception("forward failed")
                    for a in batch:
                        if not a.done.done():
                            a.done.set_exception(e)
                        if a in self.active:
                            self.active.remove(a)
                    continue
                for a, (logits, rows) in zip(batch, results):
                    if a.finish is None:  # not aborted while the forward ran
                        self._advance(a, logits, rows)
            # round-robin: requests still running after this step go behind the ones that waited
            stepped = [a for a in batch if a in self.active]
            self.active = [a for a in self.active if a not in stepped] + stepped
            await asyncio.sleep(0)

    def _advance(self, a: Active, logits: torch.Tensor, rows) -> None:
        seq, n = a.seq, len(a.feed)
        start = seq.cached - n  # position of the first fed token
        seq.routing.extend(list(rows))
        logp = torch.log_softmax(logits, -1)
        for j in range(n - 1):  # positions whose next token is already known
            seq.pos_logprobs[start + j + 1] = float(logp[j, seq.tokens[start + j + 1]])
        params = a.req.sampling_params
        max_new = int(params.get("max_new_tokens", 128))
        if len(a.output) >= max_new or len(seq.tokens) >= self.max_context:
            a.finish = {"type": "length", "length": len(a.output)}
            self._complete(a)
            return
        token, lp = self._sample(logits[-1], params, a.generator)
        seq.tokens.append(token)
        seq.pos_logprobs.append(float(logp[-1, token]))
        a.output.append(token)
        a.output_logprobs.append(lp)
        a.feed = [token]
        if token in a.eos and not params.get("ignore_eos"):
            a.finish = {"type": "stop", "matched": token}
        elif token in (params.get("stop_token_ids") or []):
            a.finish = {"type": "stop", "matched": token}
        elif len(a.output) >= max_new or len(seq.tokens) >= self.max_context:
            a.finish = {"type": "length", "length": len(a.output)}
        if a.finish is not None:
            self._complete(a)

    @staticmethod
    def _sample(logits: torch.Tensor, params: dict, gen: torch.Generator | None) -> tuple[int, float]:
        temp = float(params.get("temperature", 1.0))
        if temp == 0:
            token = int(logits.argmax())
            return token, float(torch.log_softmax(logits, -1)[token])
        logp = torch.log_softmax(logits / temp, -1)
        probs = logp.exp()
        top_k = int(params.get("top_k", -1) or -1)
        if 0 < top_k < probs.numel():
            kth = torch.topk(probs, top_k).values[-1]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        top_p = float(params.get("top_p", 1.0))
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        token = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        return token, float(logp[token])

    def _complete(self, a: Active) -> None:
        if a in self.active:
            self.active.remove(a)
        if a.session_id is not None and a.session_id in self.sessions:
            self.sessions[a.session_id] = (a.seq, a.req.rid)
        if not a.done.done():
            a.done.set_result(self._response(a))

    def _response(self, a: Active) -> dict[str, Any]:
        req, seq = a.req, a.seq
        meta: dict[str, Any] = {
            "id": req.rid, "finish_reason": a.finish, "prompt_tokens": a.prompt_len,
            "completion_tokens": len(a.output), "cached_tokens": a.cached_at_start,
            "weight_version": self.weight_version}
        if req.return_logprob:
            meta["output_token_logprobs"] = logprob_entries(a.output_logprobs, a.output)
            start = max(req.logprob_start_len, 0) if req.logprob_start_len >= 0 else a.prompt_len
            meta["input_token_logprobs"] = logprob_entries(seq.pos_logprobs[start:a.prompt_len],
                                                           seq.tokens[start:a.prompt_len])
        if req.return_routed_experts and self.routed_experts and self.model.top_k > 0:
            end = a.prompt_len + len(a.output) - 1
            rows = seq.routing[req.routed_experts_start_len:end]
            arr = np.stack(rows) if rows else np.zeros((0, self.model.num_layers, self.model.top_k), np.int32)
            meta["routed_experts"] = encode_routed_experts(arr)
        text = self.tokenizer.decode(a.output) if self.tokenizer is not None else ""
        return {"text": text, "output_ids": list(a.output), "meta_info": meta}


def _eos_ids(model: LocalModel) -> set[int]:
    eos = getattr(model.model.generation_config, "eos_token_id", None) or model.model.config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}


def _tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a checkpoint without a tokenizer still serves token ids
        return None

"""The model side of the local engine: batched generation, prompt scoring, routing capture, weight swaps.

Runs HF transformers models (CPU or GPU). `ModelRunner` is synchronous and single-threaded; the
HTTP server (rollout/transformers_server.py) calls it from one worker thread.
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


@dataclass
class Job:
    """One sequence to run: the full context, how much of it has cached KV, and what to return."""

    context: list[int]
    max_new_tokens: int
    sampling: dict[str, Any]
    logprob_start_len: int = -1
    cache: Any = None  # a DynamicCache covering context[:cached] (session continuation)
    cached: int = 0
    prior_rows: np.ndarray | None = None  # routing rows of context[:cached]
    keep_cache: bool = False  # a session turn: keep the KV cache for the next turn (runs alone)
    rid: str = ""
    aborted: threading.Event = field(default_factory=threading.Event)
    # results
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    rows: np.ndarray | None = None  # routing rows of context + output[:-1]
    finish: dict[str, Any] = field(default_factory=dict)
    new_cache: Any = None


class _AbortCriteria(StoppingCriteria):
    """Per-sequence stop for aborted requests (HF generate accepts a bool tensor per sequence)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor([j.aborted.is_set() for j in self.jobs], device=input_ids.device)


class RoutingRecorder:
    """Forward hooks on every MoE router; records the top-k expert ids of each forward call."""

    def __init__(self, model: torch.nn.Module) -> None:
        layers = model.model.layers
        self.num_layers = len(layers)
        self.top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
        self.calls: list[dict[int, torch.Tensor]] = []
        self.shape: tuple[int, int] = (0, 0)
        self.active = False
        for index, layer in enumerate(layers):
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and hasattr(gate, "top_k"):
                layer.mlp.register_forward_pre_hook(self._shape_hook)
                gate.register_forward_hook(self._make_hook(index))

    def _shape_hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.shape = tuple(args[0].shape[:2])

    def _make_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
            if not self.active:
                return
            if not self.calls or index in self.calls[-1]:
                self.calls.append({})
            b, s = self.shape
            self.calls[-1][index] = output[-1].detach().reshape(b, s, -1).to(torch.int32).cpu()
        return hook

    def stacked(self, call: dict[int, torch.Tensor]) -> np.ndarray:
        """[b, s, num_layers, top_k] for one forward call; dense layers stay 0."""
        b, s = next(iter(call.values())).shape[:2]
        out = np.zeros((b, s, self.num_layers, self.top_k), dtype=np.int32)
        for layer, idx in call.items():
            out[:, :, layer, :] = idx.numpy()
        return out


class ModelRunner:
    def __init__(self, model_path: str, *, device: str = "cpu", dtype: str = "float32",
                 capture_routing: bool = False) -> None:
        self.model_path = model_path
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()
        self.recorder = RoutingRecorder(self.model)
        self.capture_routing = capture_routing and self.recorder.top_k > 0
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.forward_calls = 0
        self.lock = threading.Lock()

    @property
    def num_layers(self) -> int:
        return self.recorder.num_layers

    # --- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """Run jobs that share sampling settings as one left-padded batch (session jobs alone)."""
        with self.lock:
            self.recorder.calls = []
            self.recorder.active = self.capture_routing
            try:
                if len(jobs) == 1 and (jobs[0].cache is not None or jobs[0].keep_cache):
                    self._run_batch(jobs, left_pad=[0])
                else:
                    width = max(len(j.context) for j in jobs)
                    self._run_batch(jobs, left_pad=[width - len(j.context) for j in jobs])
            finally:
                self.recorder.active = False

    def _run_batch(self, jobs: list[Job], left_pad: list[int]) -> None:
        width = max(p + len(j.context) for p, j in zip(left_pad, jobs))
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, (pad, job) in enumerate(zip(left_pad, jobs)):
            ids[i, pad:] = torch.tensor(job.context)
            mask[i, pad:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        max_new = max(j.max_new_tokens for j in jobs)
        if max_new == 0:
            self._score_only(jobs, ids, mask, left_pad)
            return
        sampling = jobs[0].sampling
        temperature = float(sampling.get("temperature", 1.0))
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new, min_new_tokens=int(sampling.get("min_new_tokens", 0)),
            pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=True,
            stopping_criteria=StoppingCriteriaList([_AbortCriteria(jobs)]),
            eos_token_id=None if sampling.get("ignore_eos") else (self._stop_ids(sampling) or None))
        if temperature <= 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            top_k = int(sampling.get("top_k", -1))
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(sampling.get("top_p", 1.0)),
                          top_k=top_k if top_k > 0 else 0)
        if sampling.get("sampling_seed") is not None:
            torch.manual_seed(int(sampling["sampling_seed"]))
        job0 = jobs[0]
        if job0.cache is not None:
            kwargs["past_key_values"] = copy.deepcopy(job0.cache)
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        self.forward_calls += len(out.logits)
        steps = torch.stack(out.logits, dim=1).float()  # [b, steps, V]
        scale = temperature if temperature > 0 else 1.0
        logp = torch.log_softmax(steps / scale, dim=-1)
        generated = out.sequences[:, width:]
        stops = set(kwargs["eos_token_id"] or [])
        for i, job in enumerate(jobs):
            self._finish_job(i, job, generated[i].tolist(), logp[i], stops, left_pad[i], width)
        if job0.keep_cache:
            job0.new_cache = out.past_key_values

    def _finish_job(self, i: int, job: Job, tokens: list[int], logp: torch.Tensor, stops: set[int],
                    pad: int, width: int) -> None:
        n = min(len(tokens), job.max_new_tokens)
        finish: dict[str, Any] = {"type": "length", "length": n}
        for t in range(n):
            if tokens[t] in stops:
                n, finish = t + 1, {"type": "stop", "matched": tokens[t]}
                break
        if job.aborted.is_set():
            finish = {"type": "abort"}
        job.output_ids = tokens[:n]
        job.output_logprobs = [logp[t, tok].item() for t, tok in enumerate(job.output_ids)]
        job.finish = finish
        if self.capture_routing:
            job.rows = self._rows(i, job, pad, width, n)

    def _rows(self, i: int, job: Job, pad: int, width: int, n_out: int) -> np.ndarray:
        """Rows for every token of context + output[:-1], in order (cached prefix rows first)."""
        calls = self.recorder.calls
        prefill = self.recorder.stacked(calls[0])[i]
        fed = prefill[prefill.shape[0] - (len(job.context) - job.cached):]
        decode = [self.recorder.stacked(c)[i, 0] for c in calls[1:n_out]]
        parts = [p for p in (job.prior_rows, fed, np.stack(decode) if decode else None) if p is not None]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, self.num_layers, self.recorder.top_k), np.int32)

    def _score_only(self, jobs: list[Job], ids: torch.Tensor, mask: torch.Tensor, left_pad: list[int]) -> None:
        """Prefill only: prompt logprobs (teacher scoring) and routing of the prompt."""
        job0 = jobs[0]
        kwargs: dict[str, Any] = {}
        if job0.cache is not None:
            kwargs["past_key_values"] = copy.deepcopy(job0.cache)
            ids, mask = ids[:, job0.cached:], mask
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if job0.cache is not None:
            position_ids = position_ids[:, job0.cached:]
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs).logits
        self.forward_calls += 1
        logp = torch.log_softmax(logits.float(), dim=-1)
        for i, job in enumerate(jobs):
            job.finish = {"type": "length", "length": 0}
            offset = left_pad[i] - job.cached  # logits column of context position p is p + offset
            if job.logprob_start_len >= 0:
                values: list[float | None] = []
                for p in range(job.logprob_start_len, len(job.context)):
                    values.append(None if p == 0 or p - 1 < job.cached else
                                  logp[i, p - 1 + offset, job.context[p]].item())
                job.input_logprobs = values
            if self.capture_routing:
                call = self.recorder.calls[0]
                stacked = self.recorder.stacked(call)[i]
                fed = stacked[stacked.shape[0] - (len(job.context) - job.cached):]
                parts = [p for p in (job.prior_rows, fed[:-1] if len(fed) else fed) if p is not None]
                job.rows = np.concatenate(parts, axis=0)

    def _stop_ids(self, sampling: dict[str, Any]) -> list[int]:
        return sorted(set(self.eos_ids) | set(sampling.get("stop_token_ids") or []))

    # --- weights --------------------------------------------------------------------------------
    def load_from_disk(self, path: str) -> None:
        new = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        with self.lock:
            missing, unexpected = self.model.load_state_dict(new.state_dict(), strict=False)
            if missing or unexpected:
                raise ValueError(f"{path} does not match the served model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")

    def load_tensors(self, named: dict[str, torch.Tensor]) -> int:
        """Copy HF-named tensors into the live model (checkpoint per-expert names or fused names)."""
        params = dict(self.model.named_parameters())
        updates: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, tensor in named.items():
            if name in params:
                target = params[name]
            elif (m := EXPERT_NAME.match(name)) and f"{m['prefix']}.gate_up_proj" in params:
                expert = int(m["expert"])
                if m["proj"] == "down_proj":
                    target = params[f"{m['prefix']}.down_proj"][expert]
                else:
                    fused = params[f"{m['prefix']}.gate_up_proj"][expert]
                    half = fused.shape[0] // 2
                    target = fused[:half] if m["proj"] == "gate_proj" else fused[half:]
            else:
                raise ValueError(f"tensor {name!r} is not a parameter of the served model")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model's is {tuple(target.shape)}")
            updates.append((target, tensor))
        with self.lock, torch.no_grad():
            for target, tensor in updates:
                target.copy_(tensor.to(target.dtype))
        return len(updates)

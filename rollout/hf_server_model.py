"""Model side of the local HF server: one batched forward step over per-request KV caches.

Batching design: every request owns its KV cache (per layer K/V of shape [kv_heads, len, head_dim]).
A step pads those caches into one batch ([pad | cache_i | pad | new_i] along the key axis), runs a
single forward with a 2-D attention mask and explicit position_ids, and slices each request's new
K/V back out. Requests therefore join and leave the batch at any step (continuous batching), a
session child can start from its parent's cache, and padding never changes a request's numbers
(masked keys contribute exactly zero), so a batched request equals its solo run up to float
reduction order. Everything here runs on the scheduler's single worker thread, which also
serialises weight updates against forwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from mopd.core.model_shape import read_model_shape
from rollout.hf_server_validation import read_checkpoint
from rollout.mtp import MTP_PREFIX, MTPHead

_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class StepInput:
    """One request's part of a step: its cache so far and the tokens to feed now."""
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (K, V) [heads, kv_len, dim]
    kv_len: int
    new_ids: list[int]
    want_prompt_logits: bool = False  # keep log-softmax rows of all fed positions (prompt logprobs)
    temperature: float = 1.0
    want_logits: bool = False  # keep the raw logits of every fed position (speculative verification)


@dataclass
class StepOutput:
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    last_logprobs: torch.Tensor  # [vocab] log softmax(logits/T) at the last fed position
    last_logits: torch.Tensor  # [vocab] raw logits at the last fed position (float32)
    fed_logprobs: torch.Tensor | None  # [n_new, vocab] log softmax per fed position (prompt logprobs)
    routing: np.ndarray | None  # int32 [n_new, num_layers, top_k]
    logits: torch.Tensor | None = None  # [n_new, vocab] raw logits per fed position (want_logits)
    hidden: torch.Tensor | None = None  # [n_new, hidden] pre-final-norm hidden states (models with MTP)


@dataclass
class ModelRunner:
    """The HF model plus the hooks that record which experts each MoE router picked."""
    model: Any
    device: torch.device
    num_layers: int
    top_k: int
    capture_routing: bool
    forward_steps: int = 0
    weights_version: int = 0  # counts weight loads: copies made from the weights (the MTP draft's) rebuild
    mtp: MTPHead | None = None  # MiMo-V2-Flash's MTP layers (`model.mtp.*`), the speculative draft
    _captured: dict[int, torch.Tensor] = field(default_factory=dict)
    _hidden: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype: str = "float32", capture_routing: bool = False
             ) -> ModelRunner:
        shape = read_model_shape(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        model.to(device).eval()
        cfg = model.config
        runner = cls(model=model, device=torch.device(device), num_layers=shape.num_layers,
                     top_k=shape.top_k, capture_routing=capture_routing and shape.is_moe)
        if capture_routing and not shape.is_moe:
            raise ValueError("--enable-return-routed-experts needs an MoE model (config has no num_experts_per_tok)")
        if runner.capture_routing:
            runner._install_router_hooks()
        if getattr(cfg, "model_type", "") == "mimo_v2_flash":
            runner.mtp = MTPHead.from_state(cfg, _mtp_tensors(path), dtype=getattr(torch, dtype))
            if runner.mtp is not None:
                runner.mtp.to(device)
                model.model.norm.register_forward_pre_hook(lambda _m, args: runner._hidden.append(args[0]))
        return runner

    @property
    def sliding(self) -> bool:
        """Sliding-window layers: masks are built here from positions (see `_masks`), caches keep every key."""
        return "sliding_attention" in (getattr(self.model.config, "layer_types", None) or ())

    def _install_router_hooks(self) -> None:
        """Hook every router: transformers 5 routers return (logits, scores, top-k indices)."""
        found = 0
        for name, module in self.model.named_modules():
            if not name.endswith("mlp.gate") or not hasattr(module, "top_k"):
                continue
            m = _LAYER_NAME.search(name)
            if m is None:
                continue
            layer = int(m.group(1))

            def hook(_mod: Any, _inp: Any, out: Any, layer: int = layer) -> None:
                indices = out[2] if isinstance(out, tuple) else None
                if indices is None or indices.dtype.is_floating_point:
                    raise RuntimeError(f"router of layer {layer} did not return top-k indices")
                self._captured[layer] = indices.detach()
            module.register_forward_hook(hook)
            found += 1
        if found == 0:
            raise ValueError("no MoE router modules (`*.mlp.gate` with top_k) found to capture routed experts")

    @torch.inference_mode()
    def step(self, inputs: list[StepInput]) -> list[StepOutput]:
        """One forward over all requests; see the module docstring for the padded layout."""
        b = len(inputs)
        past = max(x.kv_len for x in inputs)
        q = max(len(x.new_ids) for x in inputs)
        dev = self.device
        ids = torch.zeros(b, q, dtype=torch.long)
        pos = torch.zeros(b, q, dtype=torch.long)
        mask = torch.zeros(b, past + q, dtype=torch.long)
        for i, x in enumerate(inputs):
            n = len(x.new_ids)
            ids[i, q - n:] = torch.tensor(x.new_ids)
            pos[i, q - n:] = torch.arange(x.kv_len, x.kv_len + n)
            mask[i, past - x.kv_len:past] = 1
            mask[i, past + q - n:] = 1
        # transformers' sliding layers would crop the cache; per-request caches are sliced below instead
        cache = DynamicCache() if self.sliding else DynamicCache(config=self.model.config)
        if past > 0:
            cached = next(y for y in inputs if y.kv is not None)
            for layer in range(self.num_layers):
                ks, vs = [], []
                ref, vref = cached.kv[layer]
                for x in inputs:
                    pad = past - x.kv_len
                    k = torch.zeros(ref.shape[0], past, ref.shape[2], dtype=ref.dtype, device=dev)
                    v = torch.zeros(vref.shape[0], past, vref.shape[2], dtype=vref.dtype, device=dev)  # v_head_dim
                    if x.kv_len:
                        k[:, pad:] = x.kv[layer][0]
                        v[:, pad:] = x.kv[layer][1]
                    ks.append(k)
                    vs.append(v)
                cache.update(torch.stack(ks), torch.stack(vs), layer)
        self._captured.clear()
        self._hidden.clear()
        attn: Any = self._masks(inputs, past, q) if self.sliding else mask.to(dev)
        out = self.model(input_ids=ids.to(dev), attention_mask=attn, position_ids=pos.to(dev),
                         past_key_values=cache, use_cache=True)
        self.forward_steps += 1
        logits = out.logits.float()
        hidden = self._hidden[-1] if self._hidden else None
        results = []
        for i, x in enumerate(inputs):
            n = len(x.new_ids)
            kv = []
            for layer in range(self.num_layers):
                lay = cache.layers[layer]
                nk, nv = lay.keys[i, :, past + q - n:], lay.values[i, :, past + q - n:]
                if x.kv_len:
                    nk = torch.cat([x.kv[layer][0], nk], dim=1)
                    nv = torch.cat([x.kv[layer][1], nv], dim=1)
                kv.append((nk.contiguous(), nv.contiguous()))
            last = logits[i, -1].cpu()  # sampling runs on CPU (per-request CPU generators)
            fed = _log_softmax(logits[i, q - n:], x.temperature).cpu() if x.want_prompt_logits else None
            results.append(StepOutput(kv=kv, last_logprobs=_log_softmax(last, x.temperature), last_logits=last,
                                      fed_logprobs=fed, routing=self._routing_rows(i, b, q, n),
                                      logits=logits[i, q - n:].cpu() if x.want_logits else None,
                                      hidden=hidden[i, q - n:] if hidden is not None else None))
        return results

    def _masks(self, inputs: list[StepInput], past: int, q: int) -> dict[str, torch.Tensor]:
        """Additive [b, 1, q, past+q] masks per layer type from each request's real positions.

        transformers' own sliding-window mask measures distance in key slots, which the padded layout
        ([pad | cache_i | pad | new_i]) stretches for a request feeding fewer tokens than the widest;
        positions make the window exact in any batch. A padding query sees itself only (no empty row).
        """
        b = len(inputs)
        kpos = torch.full((b, past + q), -1, dtype=torch.long)
        qpos = torch.full((b, q), -1, dtype=torch.long)
        for i, x in enumerate(inputs):
            n = len(x.new_ids)
            kpos[i, past - x.kv_len:past] = torch.arange(x.kv_len)
            kpos[i, past + q - n:] = torch.arange(x.kv_len, x.kv_len + n)
            qpos[i, q - n:] = torch.arange(x.kv_len, x.kv_len + n)
        qq, kk = qpos[:, :, None], kpos[:, None, :]
        causal = (kk >= 0) & (qq >= 0) & (kk <= qq)
        self_slot = torch.zeros(q, past + q, dtype=torch.bool)
        self_slot[torch.arange(q), past + torch.arange(q)] = True
        window = int(self.model.config.sliding_window)
        dtype = next(self.model.parameters()).dtype
        out = {}
        for kind, allowed in (("full_attention", causal), ("sliding_attention", causal & (qq - kk < window))):
            allowed = allowed | (self_slot[None] & (qq < 0))
            out[kind] = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[:, None].to(
                self.device)
        return out

    def _routing_rows(self, i: int, b: int, q: int, n: int) -> np.ndarray | None:
        if not self.capture_routing:
            return None
        rows = np.zeros((n, self.num_layers, self.top_k), dtype=np.int32)
        for layer, idx in self._captured.items():
            rows[:, layer, :] = idx.reshape(b, q, -1)[i, q - n:].cpu().numpy()
        return rows

    @torch.inference_mode()
    def load_named_tensors(self, named: dict[str, torch.Tensor], *, require_all: bool = False) -> int:
        """Copy HF-named tensors into the live parameters in place, all or nothing.

        Accepts the model's own parameter names and the checkpoint layout transformers 5 converts
        from on load (per-expert `experts.<e>.{gate,up,down}_proj.weight` into the fused 3-D expert
        tensors). The whole payload is checked before the first copy (known names, expert indices
        in range, shapes, a floating dtype for a floating parameter, finite values, and for a full
        checkpoint no missing names), so a rejected update leaves every weight as it was.
        """
        params = self._all_parameters()
        params.update(dict(self.model.named_buffers()))
        plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        covered: set[str] = set()
        unknown: list[str] = []
        for name, tensor in named.items():
            target = self._target(params, name)
            if target is None:
                unknown.append(name)
                continue
            pname, view = target
            if tuple(view.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(view.shape)}")
            if view.dtype.is_floating_point and not tensor.dtype.is_floating_point:
                raise ValueError(f"{name}: dtype {tensor.dtype} cannot be loaded into the model's {view.dtype} "
                                 "(expected a floating-point tensor)")
            tensor = tensor.to(dtype=view.dtype, device=view.device)  # checked as it will be stored
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name}: expected finite values (in the model's {view.dtype}), got NaN or "
                                 "infinity (refused: a diverged trainer must not be served)")
            plan.append((view, tensor))
            covered.add(pname)
        if unknown:
            raise ValueError(f"unknown tensor name(s) for this model: {sorted(unknown)[:8]}")
        if require_all:
            tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
            missing = sorted(set(self._all_parameters()) - covered - tied)
            if missing:
                raise ValueError(f"checkpoint is missing tensor(s): {missing[:8]}")
        for view, tensor in plan:
            view.copy_(tensor)
        self.weights_version += 1
        return len(plan)

    def _all_parameters(self) -> dict[str, torch.Tensor]:
        """The model's parameters plus the MTP layers' under their checkpoint names (`model.mtp.layers.*`)."""
        params = dict(self.model.named_parameters())
        if self.mtp is not None:
            params.update(self.mtp.hf_parameters())
        return params

    def _target(self, params: dict[str, torch.Tensor], name: str) -> tuple[str, torch.Tensor] | None:
        if name in params:
            return name, params[name]
        if name.endswith(".self_attn.attention_sink_bias"):  # MiMo's checkpoint name of transformers' `sinks`
            sinks = name[:-len("attention_sink_bias")] + "sinks"
            return (sinks, params[sinks]) if sinks in params else None
        m = _EXPERT_NAME.match(name)
        if m is None:
            return None
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        fused = params.get(f"{prefix}.down_proj" if proj == "down_proj" else f"{prefix}.gate_up_proj")
        if fused is None:
            return None
        if e >= fused.shape[0]:
            raise ValueError(f"{name}: expert index {e} is beyond the model's {fused.shape[0]} experts "
                             f"(expected 0..{fused.shape[0] - 1})")
        if proj == "down_proj":
            return f"{prefix}.down_proj", fused[e]
        half = fused.shape[1] // 2
        return f"{prefix}.gate_up_proj", (fused[e, :half] if proj == "gate_proj" else fused[e, half:])

    def load_from_disk(self, path: str) -> int:
        """Load every *.safetensors file of an HF checkpoint directory (same architecture)."""
        return self.load_named_tensors(read_checkpoint(path), require_all=True)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the bound every token id must respect."""
        return int(self.model.get_input_embeddings().num_embeddings)


def _mtp_tensors(path: str) -> dict[str, torch.Tensor]:
    """Only the `model.mtp.*` tensors of a checkpoint directory (transformers does not load them)."""
    import glob
    import os

    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if name.startswith(MTP_PREFIX):
                    out[name] = f.get_tensor(name)
    return out


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """SGLang's logprobs: log softmax(logits / T); T = 0 (greedy) uses the plain distribution."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def sampling_probs(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int, banned: list[int]
                   ) -> torch.Tensor:
    """The distribution a request samples from at T > 0: softmax(logits/T), top-k, then top-p, renormalised.

    Speculative verification accepts drafts against exactly this distribution."""
    logits = logits.clone()
    banned = [t for t in banned if 0 <= t < logits.numel()]  # eos ids of a config may lie past the logits
    if banned:
        logits[banned] = float("-inf")
    probs = torch.softmax(logits / temperature, dim=-1)
    if 0 < top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=0)
        drop = cum - sorted_p > top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs / probs.sum()


def sample_token(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int,
                 generator: torch.Generator | None, banned: list[int]) -> int:
    """Greedy at T=0, else top-k/top-p truncated sampling; `banned` enforces min_new_tokens."""
    if temperature <= 0:
        logits = logits.clone()
        banned = [t for t in banned if 0 <= t < logits.numel()]
        if banned:
            logits[banned] = float("-inf")
        return int(torch.argmax(logits))
    probs = sampling_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k, banned=banned)
    return int(torch.multinomial(probs, 1, generator=generator))

"""Model side of the local HF server: one batched forward step over the requests' KV caches.

Batching design: a step's cache is one padded tensor per layer ([pad | cache_i | pad | new_i] along
the key axis, rollout/hf_server_batch_kv.py); a request's cache is its row of the step that last fed it,
and the next step feeds those rows straight back in (no per-request copies). Each step runs a single
forward with a 2-D attention mask from every key's position and explicit position_ids. Requests
therefore join and leave the batch at any step (continuous batching), a session child can start from
its parent's cache, and padding never changes a request's numbers (masked keys contribute exactly
zero), so a batched request equals its solo run up to float reduction order. Everything here runs on
the scheduler's single worker thread, which also serialises weight updates against forwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from mopd.core.model_shape import read_model_shape
from rollout.hf_server_batch_kv import KV, BatchKV, RowKV, assemble
from rollout.hf_server_sampling import temperature_logprobs
from rollout.hf_server_validation import read_checkpoint
from rollout.mtp import MTP_PREFIX, MTPHead

_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class StepInput:
    """One request's part of a step: its cache so far and the tokens to feed now."""
    kv: KV | None  # a step's RowKV, or per layer (K, V) [heads, >= kv_len, dim]
    kv_len: int  # positions [0, kv_len) of kv are the request's cache
    new_ids: list[int]
    want_prompt_logits: bool = False  # keep log-softmax rows of all fed positions (prompt logprobs)
    temperature: float = 1.0
    want_logits: bool = False  # keep the raw logits of every fed position (speculative verification)


@dataclass
class StepOutput:
    kv: RowKV  # the request's cache after this step: every position fed so far
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
    _plain: bool | None = None

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

    def _plain_cache(self) -> bool:
        """Whether a bare DynamicCache serves every layer: built once (building from the config costs ~ms a step).

        Sliding models use a bare one on purpose: transformers' sliding layers would crop the cache, and
        masks come from positions instead (`_masks`)."""
        if self._plain is None:
            layers = DynamicCache(config=self.model.config).layers
            self._plain = self.sliding or all(type(lay) is DynamicLayer for lay in layers)
        return self._plain

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
        dev = self.device
        past = assemble([x.kv for x in inputs], [x.kv_len for x in inputs], dev)
        rows = [inputs[i] for i in past.order]  # the batch's row order: requests of one earlier step together
        b, w = len(rows), past.width
        q = max(len(x.new_ids) for x in rows)
        ids = torch.tensor([[0] * (q - len(x.new_ids)) + x.new_ids for x in rows], dtype=torch.long)
        qpos = torch.tensor([[-1] * (q - len(x.new_ids)) + list(range(x.kv_len, x.kv_len + len(x.new_ids)))
                             for x in rows], dtype=torch.long)
        kpos = torch.cat([past.kpos, qpos], dim=1)
        cache = DynamicCache() if self._plain_cache() else DynamicCache(config=self.model.config)
        for layer, (k, v) in enumerate(past.layers or ()):
            cache.update(k, v, layer)
        self._captured.clear()
        self._hidden.clear()
        attn: Any = self._masks(kpos, qpos) if self.sliding else (kpos >= 0).long().to(dev)
        out = self.model(input_ids=ids.to(dev), attention_mask=attn, position_ids=qpos.clamp(min=0).to(dev),
                         past_key_values=cache, use_cache=True)
        self.forward_steps += 1
        layers = [(lay.keys, lay.values) for lay in cache.layers]
        if bool((qpos < 0).any()):  # padding queries' keys are never attended, but must not hold NaN
            pad = (qpos < 0).to(dev)[:, None, :, None]
            for k, v in layers:
                k[:, :, w:].masked_fill_(pad, 0)
                v[:, :, w:].masked_fill_(pad, 0)
        state = BatchKV(layers=layers, kpos=kpos, lengths=[x.kv_len + len(x.new_ids) for x in rows])
        logits = out.logits.float()
        last_all = logits[:, -1].cpu()  # sampling runs on CPU (per-request CPU generators)
        temps = torch.tensor([x.temperature if x.temperature > 0 else 1.0 for x in rows])
        last_lp = torch.log_softmax(last_all / temps[:, None], dim=-1)
        hidden = self._hidden[-1] if self._hidden else None
        routing = self._routing(b, q)
        results: list[StepOutput | None] = [None] * b
        for i, (x, lp, last) in enumerate(zip(rows, last_lp.unbind(0), last_all.unbind(0))):
            n = len(x.new_ids)
            fed = temperature_logprobs(logits[i, q - n:], x.temperature).cpu() if x.want_prompt_logits else None
            results[past.order[i]] = StepOutput(
                kv=RowKV(state, i, state.lengths[i]), last_logprobs=lp, last_logits=last,
                fed_logprobs=fed, routing=routing[i, q - n:] if routing is not None else None,
                logits=logits[i, q - n:].cpu() if x.want_logits else None,
                hidden=hidden[i, q - n:] if hidden is not None else None)
        return results  # type: ignore[return-value]

    def _masks(self, kpos: torch.Tensor, qpos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Additive [b, 1, q, width+q] masks per layer type from each key's and query's position (-1: none).

        transformers' own sliding-window mask measures distance in key slots, which the padded layout
        stretches (padding between a request's cache and its new tokens, masked keys left in the batch
        cache); positions make the window exact in any batch. A padding query sees itself only (no empty row).
        """
        q, width = qpos.shape[1], kpos.shape[1]
        qq, kk = qpos[:, :, None], kpos[:, None, :]
        causal = (kk >= 0) & (qq >= 0) & (kk <= qq)
        self_slot = torch.zeros(q, width, dtype=torch.bool)
        self_slot[torch.arange(q), width - q + torch.arange(q)] = True
        window = int(self.model.config.sliding_window)
        dtype = next(self.model.parameters()).dtype
        out = {}
        for kind, allowed in (("full_attention", causal), ("sliding_attention", causal & (qq - kk < window))):
            allowed = allowed | (self_slot[None] & (qq < 0))
            out[kind] = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[:, None].to(
                self.device)
        return out

    def _routing(self, b: int, q: int) -> np.ndarray | None:
        """int32 [b, q, num_layers, top_k]: the experts each router picked for every fed position."""
        if not self.capture_routing:
            return None
        rows = np.zeros((b, q, self.num_layers, self.top_k), dtype=np.int32)
        for layer, idx in self._captured.items():
            rows[:, :, layer, :] = idx.reshape(b, q, -1).cpu().numpy()
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

"""The model side of the local engine: one batched forward over sequences with their own KV caches.

Each sequence keeps its own per-layer (key, value) tensors. A step left-pads every cache to the
longest one and every new-token chunk to the longest chunk, so prefill chunks and decode tokens
of different requests share ONE forward; padding is masked and position ids are explicit, so a
sequence's result does not depend on what it was batched with. Forward hooks on every MoE router
record the selected experts per token (SGLang's routed-experts layout; dense layers stay 0).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class SeqState:
    """What the engine holds for one sequence: its tokens, KV cache and per-position records."""

    tokens: list[int] = field(default_factory=list)  # full context
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # covers tokens[:cached]
    cached: int = 0
    pos_logprobs: list[float | None] = field(default_factory=list)  # log p(tokens[i] | tokens[<i]), raw logits
    routing: list[np.ndarray] = field(default_factory=list)  # one [L, K] row per position fed to the model

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (and whatever of the cache covers them)."""
        self.tokens = self.tokens[:n]
        self.pos_logprobs = self.pos_logprobs[:n]
        keep = min(self.cached, n)
        if self.kv is not None and keep < self.cached:
            self.kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in self.kv]
        self.cached = keep
        self.routing = self.routing[:keep]

    def drop_cache(self) -> None:
        self.kv, self.cached, self.routing = None, 0, []


class LocalModel:
    """A HF causal LM plus the router hooks; `step` runs one batched forward."""

    def __init__(self, model_path: str, device: str = "cpu") -> None:
        self.device = torch.device(device)
        config = AutoConfig.from_pretrained(model_path)
        self.num_layers = int(config.num_hidden_layers)
        self.top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
        self.model_path = model_path
        self.model = self._load(model_path)
        self._captured: dict[int, torch.Tensor] = {}

    def _load(self, path: str) -> torch.nn.Module:
        dtype = torch.float32 if self.device.type == "cpu" else "auto"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        for name, module in model.named_modules():
            match = _LAYER.search(name + ".")
            if match and type(module).__name__.endswith("Router") and hasattr(module, "top_k"):
                module.register_forward_hook(self._hook(int(match.group(1))))
        return model

    def _hook(self, layer: int):
        def record(_module, _inputs, output) -> None:
            outs = output if isinstance(output, tuple) else (output,)
            ints = [o for o in outs if isinstance(o, torch.Tensor) and not o.is_floating_point()]
            if ints:
                self._captured[layer] = ints[-1].detach()
        return record

    # ------------------------------------------------------------------ weights
    def reload(self, path: str) -> None:
        """Swap in the weights of another checkpoint with the same architecture."""
        config = AutoConfig.from_pretrained(path)
        if int(config.num_hidden_layers) != self.num_layers:
            raise ValueError(f"model_path {path}: has {config.num_hidden_layers} layers, engine serves "
                             f"{self.num_layers}")
        self.model = self._load(path)
        self.model_path = path

    def load_named_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors into the live parameters; unknown names or shapes are an error."""
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        bad = [n for n in tensors if n not in params]
        if bad:
            raise ValueError(f"serialized_named_tensors: unknown parameter name(s) {bad[:5]}")
        with torch.no_grad():
            for name, value in tensors.items():
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ValueError(f"serialized_named_tensors: {name} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].copy_(value.to(params[name].dtype))

    @staticmethod
    def decode_safetensors_b64(entry: str) -> dict[str, torch.Tensor]:
        return load_safetensors(base64.b64decode(entry))

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def step(self, seqs: list[SeqState], feeds: list[list[int]]) -> list[tuple[torch.Tensor, np.ndarray]]:
        """Feed `feeds[i]` after `seqs[i]`'s cache in one forward.

        Returns per sequence (fp32 logits [n_i, V], routing rows [n_i, L, K]) and extends each
        sequence's KV cache by its fed tokens.
        """
        b = len(seqs)
        lmax = max(s.cached for s in seqs)
        nmax = max(len(f) for f in feeds)
        ids = torch.zeros(b, nmax, dtype=torch.long)
        mask = torch.zeros(b, lmax + nmax, dtype=torch.long)
        pos = torch.zeros(b, nmax, dtype=torch.long)
        for i, (s, f) in enumerate(zip(seqs, feeds)):
            ids[i, nmax - len(f):] = torch.tensor(f)
            mask[i, lmax - s.cached:lmax] = 1
            mask[i, lmax + nmax - len(f):] = 1
            pos[i, nmax - len(f):] = torch.arange(s.cached, s.cached + len(f))
        cache = DynamicCache()
        if lmax > 0:
            for layer in range(self.num_layers):
                ks, vs = [], []
                ref = next(s.kv for s in seqs if s.kv is not None)[layer][0]
                for s in seqs:
                    pad = lmax - s.cached
                    if s.kv is None:
                        ks.append(ref.new_zeros(1, ref.shape[1], lmax, ref.shape[3]))
                        vs.append(ref.new_zeros(1, ref.shape[1], lmax, ref.shape[3]))
                        continue
                    k, v = s.kv[layer]
                    z = k.new_zeros(1, k.shape[1], pad, k.shape[3])
                    ks.append(torch.cat([z, k], 2))
                    vs.append(torch.cat([z, v], 2))
                cache.update(torch.cat(ks), torch.cat(vs), layer)
        self._captured = {}
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), past_key_values=cache, use_cache=True)
        logits = out.logits.float().cpu()
        k_top = max(self.top_k, 1)
        routed = {layer: t.view(b, nmax, -1).cpu().numpy() for layer, t in self._captured.items()}
        results = []
        for i, (s, f) in enumerate(zip(seqs, feeds)):
            n = len(f)
            new_kv = []
            for layer in range(self.num_layers):
                k, v = cache.layers[layer].keys, cache.layers[layer].values
                new_kv.append((torch.cat([k[i:i + 1, :, lmax - s.cached:lmax], k[i:i + 1, :, lmax + nmax - n:]], 2),
                               torch.cat([v[i:i + 1, :, lmax - s.cached:lmax], v[i:i + 1, :, lmax + nmax - n:]], 2)))
            s.kv, s.cached = new_kv, s.cached + n
            rows = np.zeros((n, self.num_layers, k_top), dtype=np.int32)
            for layer, r in routed.items():
                rows[:, layer, :] = r[i, nmax - n:, :k_top]
            results.append((logits[i, nmax - n:], rows))
        return results

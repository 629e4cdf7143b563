"""MiMo-V2-Flash's MTP (multi-token prediction) layers as HF modules, for drafting in the local engine.

transformers has MiMo-V2-Flash but ignores the checkpoint's `model.mtp.*` weights, so this module
defines them after SGLang's mimo_v2_flash_nextn.py (names) and the trainer's MTP (trainer.mtp_loss):
depth k = 1..D at position i,

    x = eh_proj([enorm(E[t_{i+k}]); hnorm(h^{k-1}_i)]),   h^k = block_k(x)   (dense FFN, sliding window, sinks)
    logits = lm_head(final_layernorm_k(h^k_i))             predicts t_{i+k+1}

with h^0 the main model's last hidden state before its final norm, each depth chained on the
previous depth's output before its own final norm, the main model's embedding and lm_head shared,
and the sliding-window RoPE of the main model at the same positions. The trainer's reference test
runs `MTPHead.chain` (HF's modules); the engine drafts with `MTPHead.cached_step`, the same math on
the same parameters over new positions only (tests/rollout/test_mtp_draft.py holds the two equal),
so the draft the engine serves is the draft the trainer trains.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MTP_PREFIX = "model.mtp.layers."
_MTP_NAME = re.compile(r"^model\.mtp\.layers\.(\d+)\.(.+)$")
SLIDING = "sliding_attention"


def mtp_layer_count(names: list[str] | set[str]) -> int:
    """How many MTP blocks a checkpoint holds (from its tensor names)."""
    depths = {int(m.group(1)) for n in names if (m := _MTP_NAME.match(n))}
    return max(depths) + 1 if depths else 0


def _hf_name(local: str) -> str:
    """Our module's parameter name -> the checkpoint's (SGLang's) name inside one MTP block."""
    return (local.replace("block.post_attention_layernorm", "pre_mlp_layernorm")
            .replace("block.self_attn.sinks", "self_attn.attention_sink_bias").replace("block.", ""))


class MTPLayer(nn.Module):
    """One MTP depth: enorm/hnorm/eh_proj in front of a dense sliding-window decoder layer, final norm after."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import (
            MiMoV2FlashDecoderLayer,
            MiMoV2FlashRMSNorm,
        )

        cfg = copy.deepcopy(config)
        cfg.mlp_layer_types = ["dense"] * cfg.num_hidden_layers
        h = cfg.hidden_size
        self.enorm = MiMoV2FlashRMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = MiMoV2FlashRMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = MiMoV2FlashDecoderLayer(cfg, cfg.layer_types.index(SLIDING))
        self.final_layernorm = MiMoV2FlashRMSNorm(h, cfg.rms_norm_eps)

    def forward(self, next_emb: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[B, S, H] embeddings of t_{i+k} and h^{k-1}_i -> h^k_i (before the final norm)."""
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(hidden)], dim=-1))
        return self.block(x, attention_mask=mask, position_embeddings=rope)


class MTPHead(nn.Module):
    """The D MTP layers of a MiMo-V2-Flash checkpoint, run against the main model's embedding/lm_head."""

    def __init__(self, config: Any, num_layers: int) -> None:
        super().__init__()
        self.config = config
        self.window = int(config.sliding_window)
        self.layers = nn.ModuleList(MTPLayer(config) for _ in range(num_layers))
        self._fast: list[LayerWeights] = []
        self._fast_version: int | None = None

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def from_state(cls, config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
                   ) -> MTPHead | None:
        """Build from the checkpoint's `model.mtp.layers.*` tensors; None when it has none."""
        n = mtp_layer_count(list(state))
        if n == 0:
            return None
        head = cls(config, n).to(dtype).eval()
        named = head.hf_parameters()
        missing = sorted(set(named) - set(state))
        if missing:
            raise ValueError(f"checkpoint is missing MTP tensor(s): {missing[:8]}")
        with torch.no_grad():
            for name, param in named.items():
                if tuple(state[name].shape) != tuple(param.shape):
                    raise ValueError(f"{name}: shape {tuple(state[name].shape)} does not match {tuple(param.shape)}")
                param.copy_(state[name])
        return head

    def hf_parameters(self) -> dict[str, torch.Tensor]:
        """Checkpoint name -> live parameter (weight updates write through these)."""
        out = {}
        for k, layer in enumerate(self.layers):
            for local, param in layer.named_parameters():
                out[f"{MTP_PREFIX}{k}.{_hf_name(local)}"] = param
        return out

    def mask(self, positions: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, S, S] additive mask: causal, within the sliding window (by position), valid keys only.

        A padding query may see itself, so no row is empty."""
        q, k = positions[:, :, None], positions[:, None, :]
        allowed = (k <= q) & (q - k < self.window) & valid[:, None, :]
        allowed |= torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)[None]
        return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(
            ~allowed, float("-inf"))[:, None]

    def receptive_field(self, depths: int | None = None) -> int:
        """Positions of h^0 the last depth's output at the last position depends on."""
        return (depths or len(self.layers)) * (self.window - 1) + 1

    def chain(self, model: Any, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
              valid: torch.Tensor, depths: int | None = None) -> list[torch.Tensor]:
        """Training-form MTP on a window: logits [B, S, V] of every depth (the trainer's loss computation;
        differentiable, for pre-training the heads).

        hidden [B, S, H]: h^0 at `positions`; next_ids [B, S + depths - 1]: next_ids[:, j + k - 1] = t_{i_j+k}.
        """
        depths = depths or len(self.layers)
        S = hidden.shape[1]
        emb = model.get_input_embeddings()(next_ids)
        rope = model.model.rotary_emb(hidden, positions, SLIDING)
        mask = self.mask(positions, valid, hidden.dtype)
        out = []
        for k in range(depths):
            layer = self.layers[k]
            hidden = layer(emb[:, k:k + S], hidden, mask, rope)
            out.append(model.lm_head(layer.final_layernorm(hidden)).float())
        return out

    def fast_weights(self, version: int) -> list[LayerWeights]:
        """Per-layer fused copies of the live parameters for `cached_step`, rebuilt when `version` changes
        (the runner counts weight updates: a stale copy would draft with the old weights)."""
        if self._fast_version != version:
            self._fast = [LayerWeights.of(layer) for layer in self.layers]
            self._fast_version = version
        return self._fast

    @staticmethod
    def cached_step(w: LayerWeights, emb: torch.Tensor, hidden: torch.Tensor, past_k: torch.Tensor,
                    past_v: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One MTP layer on new positions against cached keys/values: the same math as `MTPLayer.forward`
        (HF's eager attention with sinks, partial RoPE, value scale, GQA) with fused projections.

        emb, hidden [B, S, H]; past_k [B, Hkv, M, hd], past_v [B, Hkv, M, vd] (keys already rotated,
        values scaled); mask [B, 1, 1, S, M + S] additive; cos, sin [B, S, rot]. Returns h^k [B, S, H]
        before the final norm and the new positions' keys and values (to cache).
        """
        B, S, H = hidden.shape
        x = F.rms_norm(torch.stack([emb, hidden], dim=-2), (H,), None, w.eps) * w.eh_norm
        x = F.linear(x.reshape(B, S, 2 * H), w.eh)
        y = F.linear(F.rms_norm(x, (H,), w.in_norm, w.eps), w.qkv, w.qkv_bias)
        nqk = (w.heads + w.kv_heads) * w.head_dim
        qk = y[..., :nqk].view(B, S, w.heads + w.kv_heads, w.head_dim).transpose(1, 2)
        v = y[..., nqk:].view(B, S, w.kv_heads, w.v_dim).transpose(1, 2) * w.v_scale
        r = cos.shape[-1]
        rot, half = qk[..., :r], r // 2
        rot = rot * cos[:, None] + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin[:, None]
        qk = torch.cat([rot, qk[..., r:]], dim=-1)
        g = w.heads // w.kv_heads  # query head h reads key head h // g (HF's repeat_kv)
        q, k = qk[:, :w.heads].reshape(B, w.kv_heads, g * S, w.head_dim), qk[:, w.heads:]
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        scores = (torch.matmul(q, keys.transpose(2, 3)) * w.scaling).view(B, w.kv_heads, g, S, -1) + mask
        scores = torch.cat([scores, w.sinks.expand(B, -1, -1, S, 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1].reshape(B, w.kv_heads, g * S, -1)
        attn = torch.matmul(probs, values).view(B, w.kv_heads, g, S, w.v_dim).permute(0, 3, 1, 2, 4)
        x = x + F.linear(attn.reshape(B, S, -1), w.o)
        gate, up = F.linear(F.rms_norm(x, (H,), w.post_norm, w.eps), w.gate_up).chunk(2, dim=-1)
        return x + F.linear(w.act(gate) * up, w.down), k, v


@dataclass
class LayerWeights:
    """One MTP layer's weights laid out for `MTPHead.cached_step` (q/k/v and gate/up fused)."""
    eh_norm: torch.Tensor  # [2, H]: enorm, hnorm
    eh: torch.Tensor
    in_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None  # config.attention_bias
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    final_norm: torch.Tensor
    sinks: torch.Tensor  # [1, Hkv, g, 1, 1]
    act: Any
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    v_dim: int
    scaling: float
    v_scale: float

    @classmethod
    @torch.no_grad()
    def of(cls, layer: MTPLayer) -> LayerWeights:
        attn, mlp = layer.block.self_attn, layer.block.mlp
        heads = attn.q_proj.out_features // attn.head_dim
        kv_heads = attn.k_proj.out_features // attn.head_dim
        return cls(eh_norm=torch.stack([layer.enorm.weight, layer.hnorm.weight]), eh=layer.eh_proj.weight.clone(),
                   in_norm=layer.block.input_layernorm.weight.clone(),
                   qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                   qkv_bias=(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
                             if attn.q_proj.bias is not None else None),
                   o=attn.o_proj.weight.clone(), post_norm=layer.block.post_attention_layernorm.weight.clone(),
                   gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), down=mlp.down_proj.weight.clone(),
                   final_norm=layer.final_layernorm.weight.clone(),
                   sinks=attn.sinks.detach().view(1, kv_heads, heads // kv_heads, 1, 1).clone(), act=mlp.act_fn,
                   eps=layer.enorm.variance_epsilon, heads=heads, kv_heads=kv_heads, head_dim=attn.head_dim,
                   v_dim=attn.v_head_dim, scaling=attn.scaling, v_scale=attn.v_scale)

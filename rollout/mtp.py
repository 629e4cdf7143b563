"""MiMo-V2-Flash's MTP (multi-token prediction) layers as HF modules, for drafting in the local engine.

transformers has MiMo-V2-Flash but ignores the checkpoint's `model.mtp.*` weights, so this module
defines them after SGLang's mimo_v2_flash_nextn.py (names) and the trainer's MTP (trainer.mtp_loss):
depth k = 1..D at position i,

    x = eh_proj([enorm(E[t_{i+k}]); hnorm(h^{k-1}_i)]),   h^k = block_k(x)   (dense FFN, sliding window, sinks)
    logits = lm_head(final_layernorm_k(h^k_i))             predicts t_{i+k+1}

with h^0 the main model's last hidden state before its final norm, each depth chained on the
previous depth's output before its own final norm, the main model's embedding and lm_head shared,
and the sliding-window RoPE of the main model at the same positions. The trainer's reference test
and the engine's speculative drafting both run this one module, so the draft the engine serves is
the draft the trainer trains.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
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

    @torch.no_grad()
    def draft(self, model: Any, hidden: torch.Tensor, last_ids: torch.Tensor, positions: torch.Tensor,
              valid: torch.Tensor, depths: int, pick: Any) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Draft `depths` tokens per row at the last position of the window, chaining the MTP layers.

        hidden [B, S, H] (h^0 at `positions`), last_ids [B, S] (the token after each position, the
        last one the newest sampled token). `pick(k, logits [B, V]) -> list[int]` chooses each depth's
        draft (argmax, or a sample of the draft distribution). Returns the drafts per row and the
        draft logits [B, V] per depth.
        """
        ids = last_ids
        rope = model.model.rotary_emb(hidden, positions, SLIDING)
        mask = self.mask(positions, valid, hidden.dtype)
        drafts: list[list[int]] = [[] for _ in range(hidden.shape[0])]
        logits_per_depth = []
        for k in range(depths):
            layer = self.layers[k]
            hidden = layer(model.get_input_embeddings()(ids), hidden, mask, rope)
            logits = model.lm_head(layer.final_layernorm(hidden[:, -1])).float()
            chosen = pick(k, logits)
            logits_per_depth.append(logits)
            for row, tok in zip(drafts, chosen):
                row.append(int(tok))
            # next depth: the token after position i is t_{i+k+2}: shift in the draft just made
            ids = torch.cat([ids[:, 1:], torch.tensor(chosen, dtype=ids.dtype, device=ids.device)[:, None]], dim=1)
        return drafts, logits_per_depth

"""Core attention in plain torch, with the options Megatron's DotProductAttention has and MiMo needs.

Used on CPU (Megatron's DotProductAttention allocates on the current CUDA device) and, for
MiMo-V2-Flash, on a GPU without Transformer Engine (the stock local DotProductAttention cannot
give values a head dim of their own). It reads the same config fields as Megatron's core
attention, per layer:
- `window_size=(left, 0)`: a query sees itself and the `left` tokens before it (sliding window);
- `softmax_type="learnable"`: one sink logit per head, the parameter `softmax_offset` (Megatron's
  name; gpt-oss / MiMo "attention sinks"), which joins the softmax denominator only;
- values may have a head dim other than queries/keys (taken from the tensors).
Without a window or sinks it is one causal `scaled_dot_product_attention` call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention


class TorchCoreAttention(MegatronModule):
    """Causal attention on Megatron's [s, b, heads, dim] layout: GQA, sliding window, sink logits."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None, k_channels: int | None = None,
                 v_channels: int | None = None) -> None:
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, max(1, layer_number)):
            left, right = config.window_size
            if right not in (0, -1):
                raise ValueError(f"window_size={config.window_size}: only causal windows (right = 0) are supported")
            self.window = None if left < 0 else int(left)
        if config.softmax_type == "learnable":
            self.softmax_offset = torch.nn.Parameter(torch.zeros(config.num_attention_heads,
                                                                 dtype=config.params_dtype))
        elif config.softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", torch.zeros(config.num_attention_heads), persistent=False)
        else:
            self.softmax_offset = None

    def _allowed(self, sq: int, sk: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Boolean [sq, sk] (or broadcastable with the given mask): True where a query may look."""
        q = torch.arange(sk - sq, sk, device=device)[:, None]
        k = torch.arange(sk, device=device)[None, :]
        allowed = k <= q
        if self.window is not None:
            allowed = allowed & (q - k <= self.window)
        if attention_mask is not None:  # Megatron convention: True = masked out
            allowed = allowed & ~attention_mask.bool()
        return allowed

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("TorchCoreAttention does not support packed sequences (THD)")
        sq, b, nq, _ = query.shape
        nkv, vd = key.shape[2], value.shape[3]
        if nq != nkv:  # GQA: repeat each key/value group for its query heads
            key = key.repeat_interleave(nq // nkv, dim=2)
            value = value.repeat_interleave(nq // nkv, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        dropout = self.dropout_p if self.training else 0.0
        if self.softmax_offset is None:
            if self.window is None and attention_mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                     scale=self.softmax_scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._allowed(sq, k.shape[2], attention_mask,
                                                                                      q.device),
                                                     dropout_p=dropout, scale=self.softmax_scale)
        else:
            out = self._with_sinks(q, k, v, self._allowed(sq, k.shape[2], attention_mask, q.device), dropout)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * vd)

    def _with_sinks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                    dropout: float) -> torch.Tensor:
        """softmax over [scores, sink] per head, sink column dropped: the sink only absorbs mass."""
        scale = self.softmax_scale if self.softmax_scale is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = self.softmax_offset.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        probs = F.dropout(probs, p=dropout, training=self.training)
        return torch.matmul(probs.to(v.dtype), v)

"""Everything Megatron-core 0.16.1 needs to run GPTModel on a machine without a GPU.

Kept in one module so the GPU path never sees it: `needs_cpu_compat()` decides, the model builder
applies `patch_layer_specs`, `transformer_config_overrides` and `patch_routers` only when it is true.
The pieces (see shared/FACTS.md): the stock DotProductAttention allocates on the current CUDA
device, the alltoall dispatcher creates a CUDA stream, Router.gating moves its weight to CUDA,
and RotaryEmbedding.get_emb moves inv_freq to CUDA on first use.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def needs_cpu_compat(device: str) -> bool:
    """True when the model will live on the CPU (explicitly, or because no GPU is visible)."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


class SDPACoreAttention(MegatronModule):
    """Causal core attention via torch SDPA; accepts Megatron's [s, b, heads, dim] layout and GQA."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None) -> None:
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention does not support packed sequences (THD)")
        sq, b, nq, hd = query.shape
        nkv = key.shape[2]
        if nq != nkv:  # GQA: repeat each key/value group for its query heads
            key = key.repeat_interleave(nq // nkv, dim=2)
            value = value.repeat_interleave(nq // nkv, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        mask = None
        if attention_mask is not None:  # Megatron convention: True = masked out
            causal = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril()
            mask = causal & ~attention_mask.bool()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hd)


def patch_layer_specs(layer_specs: list) -> None:
    """Swap the core attention of every layer spec for SDPACoreAttention (in place)."""
    for spec in layer_specs:
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention


def transformer_config_overrides(is_moe: bool) -> dict[str, Any]:
    """TransformerConfig fields that must differ on CPU."""
    overrides: dict[str, Any] = {"use_cpu_initialization": True}
    if is_moe:
        overrides["moe_token_dispatcher_type"] = "allgather"
    return overrides


def _cpu_gating(self: Any, input: torch.Tensor) -> torch.Tensor:
    router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
    bias = None if self.bias is None else self.bias.to(router_dtype)
    return F.linear(input.to(router_dtype), self.weight.to(router_dtype), bias)


def patch_routers(model: torch.nn.Module) -> None:
    """Replace Router.gating on each router instance by a plain F.linear (stock one moves to CUDA)."""
    from megatron.core.transformer.moe.router import Router

    for module in model.modules():
        if isinstance(module, Router):
            module.gating = types.MethodType(_cpu_gating, module)


def _cpu_rope_emb(self: Any, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
    if self.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :]


def patch_rotary(model: torch.nn.Module) -> None:
    """RotaryEmbedding.get_emb moves inv_freq to the current CUDA device; keep it on the CPU."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.get_emb = types.MethodType(_cpu_rope_emb, module)


def patch_model(model: torch.nn.Module) -> None:
    """All instance-level CPU patches of a built model."""
    patch_routers(model)
    patch_rotary(model)

"""Qwen3 (dense): pre-norm decoder with GQA, qk RMSNorm, RoPE and SwiGLU MLPs."""

from __future__ import annotations

from typing import Any

from trainer.models import common
from trainer.models.architecture import Architecture, Tensor


def transformer_kwargs(hf_config: Any) -> dict[str, Any]:
    return common.base_transformer_kwargs(hf_config)


def hf_to_megatron(hf: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    out = common.embeddings_to_megatron(hf, cfg)
    for i in range(cfg.num_hidden_layers):
        out.update(common.attention_to_megatron(hf, i, cfg))
        out.update(common.dense_mlp_to_megatron(hf, i))
    return out


def megatron_to_hf(meg: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    out = common.embeddings_to_hf(meg, cfg)
    for i in range(cfg.num_hidden_layers):
        out.update(common.attention_to_hf(meg, i, cfg))
        out.update(common.dense_mlp_to_hf(meg, i))
    return out


ARCHITECTURE = Architecture(
    model_type="qwen3",
    transformer_kwargs=transformer_kwargs,
    moe_layers=lambda cfg: [],
    hf_to_megatron=hf_to_megatron,
    megatron_to_hf=megatron_to_hf,
)

"""What one HF model family tells the builder and the converter; trainer/models/__init__.py maps
`model_type` to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class Architecture:
    """What the builder and converter need to know about one HF model family."""

    model_type: str
    transformer_kwargs: Callable[[Any], dict[str, Any]]  # hf config -> TransformerConfig fields
    moe_layers: Callable[[Any], list[int]]  # hf config -> indices of MoE layers (R3 uses them)
    hf_to_megatron: Callable[[StateDict, Any], StateDict]
    megatron_to_hf: Callable[[StateDict, Any], StateDict]
    # hf config -> number of routed experts (HF families name it differently)
    num_experts: Callable[[Any], int] = lambda cfg: getattr(cfg, "num_experts", 0) or 0
    # TransformerConfig subclass the builder instantiates with `transformer_kwargs`
    config_class: type = TransformerConfig
    # optional custom construction (config, hf_config, use_te, on_cpu) -> GPTModel; None = stock GPT specs
    build: Callable[..., Any] | None = None


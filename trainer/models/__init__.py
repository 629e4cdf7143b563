"""Per-architecture model definitions (TransformerConfig fields + HF<->Megatron weight maps)."""

from trainer.models import mimo_v2_flash, qwen3, qwen3_moe  # noqa: F401  (register on import)
from trainer.models.registry import Architecture, get_architecture, register

__all__ = ["Architecture", "get_architecture", "register"]

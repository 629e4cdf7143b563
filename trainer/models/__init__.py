"""Per-architecture model definitions (TransformerConfig fields + HF<->Megatron weight maps)."""

from trainer.models.registry import Architecture, get_architecture, register
from trainer.models import qwen3, qwen3_moe  # noqa: F401  (register on import)

__all__ = ["Architecture", "get_architecture", "register"]

"""Per-architecture model definitions keyed by HF `model_type`: a new family is one module that
defines `ARCHITECTURE` (its TransformerConfig fields and HF<->Megatron weight maps), listed here."""

from __future__ import annotations

from trainer.models import mimo_v2_flash, qwen3, qwen3_moe
from trainer.models.architecture import Architecture

ARCHITECTURES: dict[str, Architecture] = {
    module.ARCHITECTURE.model_type: module.ARCHITECTURE for module in (qwen3, qwen3_moe, mimo_v2_flash)
}


def get_architecture(model_type: str) -> Architecture:
    """The family for an HF config's `model_type`; an unsupported one is a clear error."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"hf config model_type={model_type!r} is not supported by the trainer; "
                         f"expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


__all__ = ["ARCHITECTURES", "Architecture", "get_architecture"]

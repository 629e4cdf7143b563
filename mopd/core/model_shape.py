"""The MoE shape of a checkpoint, read from its config.json: the one reader every package uses.

Routing replay (R3) needs `num_hidden_layers` and `num_experts_per_tok` to decode an engine's routed
experts ([tokens, num_hidden_layers, top_k], dense layers included) and to decide whether an engine
must capture them at all; a dense model has no `num_experts_per_tok` (top_k 0: nothing to replay).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    num_layers: int  # config.json num_hidden_layers (MTP blocks are not counted there)
    top_k: int  # config.json num_experts_per_tok; 0 for a dense model

    @property
    def is_moe(self) -> bool:
        return self.top_k > 0


def read_model_shape(model_path: str | Path) -> ModelShape:
    """Read config.json of an HF checkpoint directory; errors name the file and the field."""
    path = Path(model_path) / "config.json"
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        config = {}  # not an object: reported below as a missing field
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers <= 0:
        raise ValueError(f"{path}: num_hidden_layers must be a positive integer, got {layers!r}")
    top_k = config.get("num_experts_per_tok") or 0
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"{path}: num_experts_per_tok must be a non-negative integer, got {top_k!r}")
    return ModelShape(num_layers=layers, top_k=top_k)

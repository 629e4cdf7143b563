"""HF checkpoints on disk: read safetensors shards directly (trainer/hf_shards.py writes them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# files copied verbatim from the source model dir so the export loads with AutoTokenizer as well
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
               "added_tokens.json", "tokenizer.model")


def _weight_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p.name for p in sorted(path.glob("*.safetensors"))]


def tensor_names(model_path: str | Path) -> list[str]:
    """Names of the tensors of an HF checkpoint, read from the safetensors headers only."""
    path = Path(model_path)
    names: list[str] = []
    for name in _weight_files(path):
        with safe_open(str(path / name), framework="pt") as f:
            names.extend(f.keys())
    return names


def load_hf_state(model_path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint (single file or sharded with an index)."""
    path = Path(model_path)
    files = _weight_files(path)
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights under {path} (expected an HF checkpoint dir)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state

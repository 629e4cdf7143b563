"""Checkpoints. The driver lays out `checkpoints/step_N/` as `trainer/` (this module's exact training
state: `TrainerGroup.save_checkpoint(step_N/trainer)`) and `hf/` (`TrainerGroup.export_hf(step_N/hf)`).

`trainer/` (format 2, trainer/sharded_checkpoint.py): each rank writes the part of the model, fp32 masters
and AdamW moments that it holds and no other rank wrote (`shards_rank<r>_<i>.safetensors`), rank 0 an
`index.json` of where every part of every tensor is; any layout (TP/PP/EP/DP) resumes it, each rank
reading only its own slices. Each rank writes its own RNG state (`rng_rank<r>.pt`). Format 1 (`state.pt`:
everything gathered onto rank 0) is still read. Writes go to a temp name first so a crash never leaves a
half-written file under the final name.

`hf/`: transformers' safetensors layout (`model.safetensors`, or shards + `model.safetensors.index.json`
when the model spans several buckets), written bucket by bucket as the ranks gather it
(trainer/weight_gather.py, trainer/hf_shards.py): no rank holds the whole model.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from trainer import sharded_checkpoint
from trainer.hf_shards import Bucket, write_sharded

LEGACY_FORMAT = 1  # state.pt, gathered on rank 0 (trainer/parallel_checkpoint.py reshards it on load)


class SizedBuckets(Iterable[Bucket], Protocol):
    def __len__(self) -> int: ...


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_trainer_state(path: str | Path, trainer: Any, rank: int) -> dict[str, int]:
    """A collective: every rank writes its part of `trainer`'s (TrainerRank) state and its RNG; returns the
    bytes of tensors this rank wrote per file."""
    d = Path(path)
    sizes = sharded_checkpoint.save(trainer, d)
    _atomic_save(rng_state(), d / f"rng_rank{rank}.pt")
    return sizes


def load_trainer_state(path: str | Path, trainer: Any, rank: int) -> dict[str, Any] | None:
    """Load this rank's part of a checkpoint (written at any layout) into `trainer`; returns the rank's
    saved RNG state (None when the checkpoint had fewer ranks)."""
    d = Path(path)
    if (d / sharded_checkpoint.INDEX).exists():
        sharded_checkpoint.load(trainer, d)
    elif (d / "state.pt").exists():
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
        if state.get("format_version") != LEGACY_FORMAT:
            raise ValueError(f"{d / 'state.pt'}: format_version {state.get('format_version')}, expected "
                             f"{LEGACY_FORMAT}")
        trainer.load_state_dict(state)
    else:
        raise FileNotFoundError(f"no trainer state at {d} (expected {sharded_checkpoint.INDEX} or state.pt, "
                                "a dir written by save_checkpoint)")
    rng_file = d / f"rng_rank{rank}.pt"
    return torch.load(rng_file, weights_only=False) if rng_file.exists() else None


def export_hf(path: str | Path, weights: SizedBuckets | Mapping[str, torch.Tensor], source_dir: str | Path) -> Path:
    """HF safetensors + config.json + tokenizer files of the source model (loads with from_pretrained), from
    buckets of HF tensors written as they come (`TrainerRank.hf_buckets`) or from one dict of them."""
    if isinstance(weights, Mapping):
        weights = [list(weights.items())]
    return write_sharded(iter(weights), len(weights), path, source_dir)

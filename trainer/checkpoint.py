"""Checkpoints. The driver lays out `checkpoints/step_N/` as `trainer/` (this module's exact training
state: `TrainerGroup.save_checkpoint(step_N/trainer)`) and `hf/` (`TrainerGroup.export_hf(step_N/hf)`).

Model, optimizer and scheduler are identical on every data-parallel rank, so rank 0 writes them
once (`state.pt`); under TP/PP/EP the ranks first gather them under single-rank names
(trainer.parallel_checkpoint), so any layout resumes them. Each rank writes its own RNG state
(`rng_rank<r>.pt`). Writes go to a temp
name first so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.hf_io import save_hf

FORMAT_VERSION = 1


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


def save_trainer_state(path: str | Path, rank_state: dict[str, Any] | None, rank: int) -> None:
    """rank_state (TrainerRank.state_dict) only from rank 0 (None elsewhere); every rank saves its RNG."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    if rank_state is not None:
        _atomic_save({"format_version": FORMAT_VERSION, **rank_state}, d / "state.pt")
    _atomic_save(rng_state(), d / f"rng_rank{rank}.pt")


def load_trainer_state(path: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    d = Path(path)
    if not (d / "state.pt").exists():
        raise FileNotFoundError(f"no trainer state at {d / 'state.pt'} (expected a dir written by save_checkpoint)")
    state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d / 'state.pt'}: format_version {state.get('format_version')}, expected {FORMAT_VERSION}")
    rng_file = d / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
    return state, rng


def export_hf(path: str | Path, hf_state: dict[str, torch.Tensor], source_dir: str | Path) -> Path:
    """HF safetensors + config.json + tokenizer files of the source model (loads with from_pretrained)."""
    return save_hf(path, hf_state, source_dir)

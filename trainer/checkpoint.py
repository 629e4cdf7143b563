"""Checkpoints. The driver lays out `checkpoints/step_N/` as `trainer/` (this module's exact training
state: `TrainerGroup.save_checkpoint(step_N/trainer)`) and `hf/` (`TrainerGroup.export_hf(step_N/hf)`).

Model, optimizer and scheduler are identical on every data-parallel rank, so rank 0 writes them
once (`state.pt`); under tensor/expert parallelism each rank holds its own part and writes
`state_rank<r>.pt`, tagged with the layout, which a resume must match (no resharding yet).
Each rank writes its own RNG state (`rng_rank<r>.pt`). Writes go to a temp
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


def save_trainer_state(path: str | Path, rank_state: dict[str, Any] | None, rank: int, *,
                       layout: dict[str, int] | None = None) -> None:
    """rank_state (TrainerRank.state_dict) from rank 0 only (None elsewhere), or from every rank with its
    `layout` (sizes) when the model is sharded; every rank saves its RNG."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    if rank_state is not None:
        name = "state.pt" if layout is None else f"state_rank{rank}.pt"
        _atomic_save({"format_version": FORMAT_VERSION, "layout": layout, **rank_state}, d / name)
    _atomic_save(rng_state(), d / f"rng_rank{rank}.pt")


def load_trainer_state(path: str | Path, rank: int, *, layout: dict[str, int] | None = None,
                       ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This rank's state; `layout` (the sizes of a sharded model, None when unsharded) must be the saved one."""
    d = Path(path)
    file = d / ("state.pt" if layout is None else f"state_rank{rank}.pt")
    if not file.exists():
        raise FileNotFoundError(f"no trainer state at {file} (expected a dir written by save_checkpoint with the "
                                f"same trainer layout {layout or 'tp=pp=ep=1'}; resharding is not supported yet)")
    state = torch.load(file, map_location="cpu", weights_only=False)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {state.get('format_version')}, expected {FORMAT_VERSION}")
    if state.get("layout") != layout:
        raise ValueError(f"{file}: saved with trainer layout {state.get('layout')}, this run has {layout} "
                         "(resharding a checkpoint is not supported yet: resume with the saved layout)")
    rng_file = d / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
    return state, rng


def export_hf(path: str | Path, hf_state: dict[str, torch.Tensor], source_dir: str | Path) -> Path:
    """HF safetensors + config.json + tokenizer files of the source model (loads with from_pretrained)."""
    return save_hf(path, hf_state, source_dir)

"""Parameter merging of HF checkpoints that share an architecture: weight averaging and task arithmetic.

These are the merging baselines that MOPD is compared against: no training, just arithmetic on
the teachers' weights (task arithmetic: base + scale * sum_i (expert_i - base)).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def _check_same_keys(states: list[dict[str, torch.Tensor]], paths: list[Path]) -> None:
    keys = set(states[0])
    for state, path in zip(states[1:], paths[1:]):
        if set(state) != keys:
            diff = sorted(keys ^ set(state))[:5]
            raise ValueError(f"{path} does not have the same tensors as {paths[0]} (e.g. {diff})")
        for k in keys:
            if state[k].shape != states[0][k].shape:
                raise ValueError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(states[0][k].shape)}")


def _save(state: dict[str, torch.Tensor], like: Path, out: str | Path) -> Path:
    """Write merged weights with the config and tokenizer files of `like`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in like.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, out / WEIGHTS, metadata={"format": "pt"})
    return out


def average(paths: list[str | Path], out: str | Path) -> Path:
    """Uniform weight average of the checkpoints."""
    paths = [Path(p) for p in paths]
    states = [load_state(p) for p in paths]
    _check_same_keys(states, paths)
    merged = {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}
    return _save(merged, paths[0], out)


def task_arithmetic(base: str | Path, experts: list[str | Path], out: str | Path, scale: float = 1.0) -> Path:
    """base + scale * sum of task vectors (expert - base)."""
    base, experts = Path(base), [Path(p) for p in experts]
    states = [load_state(p) for p in [base, *experts]]
    _check_same_keys(states, [base, *experts])
    base_state = states[0]
    merged = {}
    for k, b in base_state.items():
        delta = sum(s[k].float() - b.float() for s in states[1:])
        merged[k] = (b.float() + scale * delta).to(b.dtype)
    return _save(merged, experts[0], out)

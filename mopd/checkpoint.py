"""Driver-side checkpoint state: which step, the data streams' position, the weight version, the wandb id.

The trainer writes `trainer/` (full training state) and `hf/` (student export) inside the step
directory; with rollout.scheduler=sequence, `scheduler.json` + `scheduler.npz` hold the sequence
scheduler's groups and sequences in flight (its arrays in the .npz, no pickle); `driver.json` is
written last, so its presence marks a complete checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DRIVER_FILE = "driver.json"
SCHEDULER_FILE = "scheduler.json"
SCHEDULER_ARRAYS = "scheduler.npz"
_ARRAY_KEY = "__ndarray__"  # {"__ndarray__": "a3"}: array a3 of scheduler.npz stands here


@dataclass
class DriverState:
    step: int  # the next step to run
    data: dict[str, Any] = field(default_factory=dict)  # mopd/data.py DataScheduler.state_dict
    weight_version: int = 0
    wandb_id: str | None = None
    sampled_tokens: int = 0  # response tokens sampled so far (the max_sampled_tokens budget)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def write_driver_state(path: Path, state: DriverState) -> None:
    tmp = path / (DRIVER_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path / DRIVER_FILE)


def latest_checkpoint(run_dir: Path) -> tuple[Path, DriverState] | None:
    """The newest complete checkpoint under run_dir, or None."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    candidates = []
    for d in root.iterdir():
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / DRIVER_FILE).is_file():
            candidates.append((int(m.group(1)), d))
    if not candidates:
        return None
    _, path = max(candidates)
    return path, DriverState(**json.loads((path / DRIVER_FILE).read_text()))


def write_scheduler_state(path: Path, state: dict[str, Any]) -> None:
    """The sequence scheduler's state_dict (JSON values and numpy arrays) as scheduler.json + scheduler.npz."""
    arrays: dict[str, np.ndarray] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            name = f"a{len(arrays)}"
            arrays[name] = value
            return {_ARRAY_KEY: name}
        if isinstance(value, dict):
            if _ARRAY_KEY in value:
                raise ValueError(f"scheduler state uses the reserved key {_ARRAY_KEY!r}")
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    text = json.dumps(encode(state))
    with open(path / SCHEDULER_ARRAYS, "wb") as f:
        np.savez(f, **arrays)
    (path / SCHEDULER_FILE).write_text(text)


def read_scheduler_state(path: Path) -> dict[str, Any] | None:
    """The state `write_scheduler_state` wrote in a step directory, or None if it holds none (a batch run)."""
    if not (path / SCHEDULER_FILE).is_file():
        return None
    with np.load(path / SCHEDULER_ARRAYS, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            return arrays[value[_ARRAY_KEY]] if set(value) == {_ARRAY_KEY} else {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(json.loads((path / SCHEDULER_FILE).read_text()))

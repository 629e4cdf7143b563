"""Driver-side checkpoint state: which step, the data streams' position, the weight version, the wandb id.

The trainer writes `trainer/` (full training state) and `hf/` (student export) inside the step
directory; `driver.json` is written last, so its presence marks a complete checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

DRIVER_FILE = "driver.json"


@dataclass
class DriverState:
    step: int  # the next step to run
    data: dict[str, int] = field(default_factory=dict)
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

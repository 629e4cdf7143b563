"""Where a run's numbers go: metrics.jsonl (one object per step), wandb, and a terminal progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import PreTrainedTokenizerBase

from mopd.config import LoggerConfig
from mopd.core.types import Sample


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict[str, Any], *, total_steps: int,
                 start_step: int, wandb_id: str | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.wandb = None
        self.wandb_id = wandb_id
        if cfg.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name or run_dir.name,
                                    dir=str(run_dir), mode=cfg.wandb_mode, config=config, id=wandb_id,
                                    resume="allow" if wandb_id else None, reinit="finish_previous")
            self.wandb_id = self.wandb.id
        self.progress = None
        if cfg.progress:
            self.progress = Progress(TextColumn("[bold]mopd"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.progress is not None:
            info = f"loss {metrics.get('train/loss', float('nan')):.4f}  reward {metrics.get('rollout/reward', 0):.3f}"
            self.progress.update(self.task, completed=step + 1, info=info)

    def dump_samples(self, step: int, samples: list[Sample], tokenizer: PreTrainedTokenizerBase) -> None:
        """One line per trajectory, for reading what the student wrote and how it was scored."""
        out = self.path.parent / "samples"
        out.mkdir(exist_ok=True)
        with open(out / f"step_{step}.jsonl", "w") as f:
            for s in samples:
                kl = None
                if s.teacher_logprobs is not None and any(s.loss_mask):
                    pairs = [(m, t) for m, t, k in zip(s.rollout_logprobs, s.teacher_logprobs, s.loss_mask) if k]
                    kl = sum(m - t for m, t in pairs) / len(pairs)
                f.write(json.dumps({
                    "prompt_index": s.prompt_index, "domain": s.domain, "teacher": s.teacher,
                    "prompt": tokenizer.decode(s.prompt_ids), "response": s.response_text, "label": s.label,
                    "reward": s.reward, "reverse_kl": kl, "finish_reason": s.finish_reason,
                    "response_tokens": s.num_response_tokens, "weight_version": max(s.weight_versions, default=0),
                }) + "\n")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()

    def _truncate_after(self, start_step: int) -> None:
        """On resume, drop records of steps that the checkpoint does not contain (they will be redone)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] < start_step]
        self.path.write_text("".join(line + "\n" for line in kept))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

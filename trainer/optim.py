"""AdamW + LR schedule, with fp32 master weights when the model's parameters are bf16.

torch AdamW rather than Megatron's get_megatron_optimizer: with TP=PP=EP=1 it is exact, its
state_dict round-trips bit for bit (exact resume), and it needs neither Megatron's DDP grad
buffers nor CUDA (under TP/PP/EP the gradient norm is summed over ranks, trainer.parallel.grad_norm_sq).
For a bf16 model the optimizer steps fp32 copies of the parameters (as
Megatron's mixed-precision optimizer does) and copies them back, so small updates are not lost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from trainer import parallel
from trainer.config import TrainerConfig


def lr_lambda(cfg: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr at a step: linear warmup, then constant / cosine / linear to min_lr."""
    floor = cfg.min_lr / cfg.lr

    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return fn


class Optimizer:
    """Steps the model's parameters from their (already all-reduced) gradients."""

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, total_steps: int) -> None:
        self.params = list(model.parameters())
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        if self.mixed:
            self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        else:
            self.masters = self.params
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.grad_clip = cfg.grad_clip

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> tuple[float, float]:
        """Clip (cfg.grad_clip; 0 = off), step, advance the schedule; returns (grad norm, lr used)."""
        if self.mixed:
            for p, m in zip(self.params, self.masters):
                m.grad = p.grad.float()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        if parallel.model_parallel():
            grad_norm = self._clip_sharded(max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.masters, max_norm).item()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        return grad_norm, lr

    def _clip_sharded(self, max_norm: float) -> float:
        """clip_grad_norm_ when each rank holds part of the weights: the norm is over the whole model."""
        norm = parallel.grad_norm_sq(self.masters, self.params).sqrt().item()
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for m in self.masters:
                if m.grad is not None:
                    m.grad.mul_(coef)
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "masters": [m.detach().clone() for m in self.masters] if self.mixed else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.mixed:
            if state.get("masters") is None:
                raise ValueError("checkpoint has no fp32 master weights but the model is bf16 "
                                 "(it was saved with trainer.dtype=float32)")
            with torch.no_grad():
                for p, m, saved in zip(self.params, self.masters, state["masters"]):
                    m.copy_(saved)
                    p.copy_(saved)

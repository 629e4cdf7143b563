"""Format 1 trainer checkpoints gathered under single-rank names (`state.pt` with layout "full"), resumed
at any layout: kept so that checkpoints written before trainer/sharded_checkpoint.py still load.

Every weight, its fp32 master (bf16 models) and its AdamW moments have the weight's shape, so the
same cut that loads HF weights onto a rank (trainer.parallel.shard_state) carries the optimizer too.
The state is keyed by the single-rank (TP=PP=EP=1) weight names; the scheduler, step counts and
hyper-parameters are the same on every rank.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer import parallel
from trainer.model_builder import load_megatron_state

FULL = "full"  # the `layout` tag of a gathered (format 1) checkpoint
MOMENTS = ("exp_avg", "exp_avg_sq")


def _by_name(trainer: Any) -> tuple[list[str], dict[int, str]]:
    """Local parameter names in model order, and id(master weight) -> name."""
    names = [n for n, _ in trainer.model.named_parameters()]
    return names, {id(m): n for n, m in zip(names, trainer.optim.masters)}


def load_training_state(trainer: Any, state: dict[str, Any]) -> None:
    """This rank's part of a gathered training state, at this rank's layout."""
    model, optim = trainer.model, trainer.optim
    load_megatron_state(model, parallel.shard_state(state["model"], model))
    names, _ = _by_name(trainer)
    if optim.mixed:
        if state["masters"] is None:
            raise ValueError("checkpoint has no fp32 master weights but the model is bf16 "
                             "(it was saved with trainer.dtype=float32)")
        masters = parallel.shard_state(state["masters"], model, params_only=True)
        with torch.no_grad():
            for n, m in zip(names, optim.masters):
                m.copy_(masters[n])
    moments = {key: {n: t.clone() for n, t in parallel.shard_state(state["adam"][key], model, params_only=True).items()}
               for key in MOMENTS} if state["adam"] is not None else None  # own copies, not views of the whole
    set_optimizer_state(trainer, state["hyper"], state["scheduler"], int(state["step"]),
                        state["adam"]["step"] if state["adam"] is not None else None, moments)


def set_optimizer_state(trainer: Any, hyper: list[dict[str, Any]], scheduler: dict[str, Any], step: int,
                        adam_step: float | None, moments: dict[str, dict[str, torch.Tensor]] | None) -> None:
    """AdamW and the schedule from saved hyper-parameters and this rank's moments (by local parameter name;
    AdamW keeps these tensors as its state)."""
    optim = trainer.optim
    _, name_of = _by_name(trainer)
    current = optim.optimizer.state_dict()
    if len(current["param_groups"]) != len(hyper):
        raise ValueError(f"checkpoint has {len(hyper)} optimizer parameter groups, this trainer "
                         f"{len(current['param_groups'])}")
    groups = [{**h, "params": group["params"]} for h, group in zip(hyper, current["param_groups"])]
    adam: dict[int, dict[str, torch.Tensor]] = {}
    if moments is not None:
        index = 0  # torch numbers parameters across groups in order
        for group in optim.optimizer.param_groups:
            for m in group["params"]:
                n = name_of[id(m)]
                adam[index] = {"step": torch.tensor(adam_step), "exp_avg": moments["exp_avg"][n],
                               "exp_avg_sq": moments["exp_avg_sq"][n]}
                index += 1
    optim.optimizer.load_state_dict({"state": adam, "param_groups": groups})
    optim.scheduler.load_state_dict(scheduler)
    trainer.step = step

"""Training state that reshards: saved at one layout (TP/PP/EP), resumed at any other.

Every weight, its fp32 master (bf16 models) and its AdamW moments have the weight's shape, so the
same cut that loads HF weights onto a rank (trainer.parallel.shard_state) and the same gather that
exports them (trainer.parallel.gather_state) carry the optimizer too. The saved state is keyed by
the single-rank (TP=PP=EP=1) weight names; the scheduler, step counts and hyper-parameters are the
same on every rank. Gathering is a collective; rank 0 writes the result (trainer.checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer import parallel
from trainer.model_builder import load_megatron_state

FULL = "full"  # the `layout` tag of a resharding checkpoint


def _by_name(trainer: Any) -> tuple[list[str], dict[int, str]]:
    """Local parameter names in model order, and id(master weight) -> name."""
    names = [n for n, _ in trainer.model.named_parameters()]
    return names, {id(m): n for n, m in zip(names, trainer.optim.masters)}


def gather_training_state(trainer: Any) -> dict[str, Any]:
    """Model, masters and AdamW state of the whole model under single-rank names (collective)."""
    model, optim = trainer.model, trainer.optim
    names, _ = _by_name(trainer)
    state: dict[str, Any] = {"layout": FULL, "step": trainer.step, "scheduler": optim.scheduler.state_dict(),
                             "hyper": [{k: v for k, v in g.items() if k != "params"}
                                       for g in optim.optimizer.state_dict()["param_groups"]]}
    state["model"] = parallel.gather_state(model, {k: v for k, v in model.state_dict().items()
                                                   if not k.endswith("_extra_state")})
    state["masters"] = parallel.gather_state(model, {n: m.detach() for n, m in zip(names, optim.masters)}) \
        if optim.mixed else None
    adam = optim.optimizer.state
    if adam:
        moments = {key: parallel.gather_state(model, {n: adam[m][key] for n, m in zip(names, optim.masters)})
                   for key in ("exp_avg", "exp_avg_sq")}
        state["adam"] = {**moments, "step": float(adam[optim.masters[0]]["step"])}
    else:
        state["adam"] = None
    return state


def load_training_state(trainer: Any, state: dict[str, Any]) -> None:
    """This rank's part of a gathered training state, at this rank's layout."""
    model, optim = trainer.model, trainer.optim
    load_megatron_state(model, parallel.shard_state(state["model"], model))
    names, name_of = _by_name(trainer)
    if optim.mixed:
        if state["masters"] is None:
            raise ValueError("checkpoint has no fp32 master weights but the model is bf16 "
                             "(it was saved with trainer.dtype=float32)")
        masters = parallel.shard_state(state["masters"], model, params_only=True)
        with torch.no_grad():
            for n, m in zip(names, optim.masters):
                m.copy_(masters[n])
    current = optim.optimizer.state_dict()
    if len(current["param_groups"]) != len(state["hyper"]):
        raise ValueError(f"checkpoint has {len(state['hyper'])} optimizer parameter groups, this trainer "
                         f"{len(current['param_groups'])}")
    groups = [{**hyper, "params": group["params"]} for hyper, group in zip(state["hyper"], current["param_groups"])]
    adam: dict[int, dict[str, torch.Tensor]] = {}
    if state["adam"] is not None:
        moments = {key: parallel.shard_state(state["adam"][key], model, params_only=True)
                   for key in ("exp_avg", "exp_avg_sq")}
        index = 0  # torch numbers parameters across groups in order
        for group in optim.optimizer.param_groups:
            for m in group["params"]:
                n = name_of[id(m)]
                adam[index] = {"step": torch.tensor(state["adam"]["step"]),
                               "exp_avg": moments["exp_avg"][n].clone(), "exp_avg_sq": moments["exp_avg_sq"][n].clone()}
                index += 1
    optim.optimizer.load_state_dict({"state": adam, "param_groups": groups})
    optim.scheduler.load_state_dict(state["scheduler"])
    trainer.step = int(state["step"])

"""The sequence scheduler's groups and how they are saved: a group is the n samples of one prompt (GRPO), and
the scheduler's state is its groups as plain data (JSON-able values plus numpy arrays, no pickled objects),
so a checkpoint restores finished groups, partial single-turn samples and prompts in flight exactly."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mopd.core.types import Sample
from rollout.trajectory import Trajectory

STATE_VERSION = 1


@dataclass
class Group:
    """One prompt's samples on their way through the scheduler.

    `originals` are prompt-only copies taken before any generation (a restart from scratch uses them);
    `samples` are the live ones. Per sample: `resume` (continue its saved partial response) and `finished`."""

    id: int
    source: str
    originals: list[Sample]
    samples: list[Sample]
    resume: list[bool]
    finished: list[bool]
    tasks: list[asyncio.Task] = field(default_factory=list)
    trajectories: dict[int, Trajectory] = field(default_factory=dict)
    restarts: int = 0  # times its unfinished samples were thrown away and the prompt queued again

    @classmethod
    def fresh(cls, group_id: int, source: str, originals: list[Sample]) -> Group:
        n = len(originals)
        return cls(group_id, source, originals, [copy.deepcopy(s) for s in originals], [False] * n, [False] * n)

    @property
    def unfinished(self) -> int:
        return self.finished.count(False)

    def oldest_version(self) -> int | None:
        """The weight version of the group's oldest sampled token (None before any token was sampled)."""
        versions = [v for s in self.samples for v, m in zip(s.weight_versions, s.loss_mask) if m]
        return min(versions) if versions else None

    def generated_tokens(self) -> int:
        return sum(sum(s.loss_mask) for s in self.samples)


def sample_state(sample: Sample) -> dict[str, Any]:
    """A Sample as plain data: every field, `routed_experts` stays a numpy array."""
    state = {f.name: copy.deepcopy(getattr(sample, f.name)) for f in dataclasses.fields(sample)}
    if sample.routed_experts is not None:
        state["routed_experts"] = np.array(sample.routed_experts, dtype=np.int32)
    return state


def sample_from_state(state: dict[str, Any]) -> Sample:
    names = {f.name for f in dataclasses.fields(Sample)}
    unknown = sorted(set(state) - names)
    if unknown:
        raise ValueError(f"scheduler state: a saved sample has unknown field(s) {unknown}")
    sample = Sample(**copy.deepcopy(state))
    if sample.routed_experts is not None:
        sample.routed_experts = np.asarray(sample.routed_experts, dtype=np.int32)
    sample.check()
    return sample


def group_state(group: Group, *, keep_partial: list[bool]) -> dict[str, Any]:
    """A group in flight: finished samples whole, partial ones (keep_partial) with their tokens so far, the
    others as their prompt (regenerated from scratch after a restore)."""
    samples: list[dict[str, Any] | None] = []
    for i, sample in enumerate(group.samples):
        if group.finished[i]:
            samples.append({"finished": True, "sample": sample_state(sample)})
        elif keep_partial[i] and sample.response_ids:
            trajectory = group.trajectories.get(i)
            live = trajectory.partial_state() if trajectory is not None else sample
            samples.append({"finished": False, "sample": sample_state(live)})
        else:
            samples.append(None)
    return {"source": group.source, "originals": [sample_state(s) for s in group.originals], "samples": samples}


def group_from_state(group_id: int, state: dict[str, Any]) -> Group:
    originals = [sample_from_state(s) for s in state["originals"]]
    group = Group.fresh(group_id, str(state["source"]), originals)
    if len(state["samples"]) != len(originals):
        raise ValueError(f"scheduler state: group of {len(originals)} prompts has {len(state['samples'])} samples")
    for i, saved in enumerate(state["samples"]):
        if saved is None:
            continue
        group.samples[i] = sample_from_state(saved["sample"])
        group.finished[i] = bool(saved["finished"])
        group.resume[i] = not group.finished[i]
    return group


def finished_group_state(group: Group) -> dict[str, Any]:
    return {"source": group.source, "originals": [sample_state(s) for s in group.originals],
            "samples": [sample_state(s) for s in group.samples]}


def finished_group_from_state(group_id: int, state: dict[str, Any]) -> Group:
    originals = [sample_from_state(s) for s in state["originals"]]
    group = Group.fresh(group_id, str(state["source"]), originals)
    group.samples = [sample_from_state(s) for s in state["samples"]]
    group.finished = [True] * len(group.samples)
    return group

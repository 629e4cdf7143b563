"""The driver's side of rollout.scheduler=sequence: the SequenceScheduler (rollout/scheduler.py) behind the
few calls the loops make (mopd/train.py, mopd/train_async.py).

Each finished group is scored on the scheduler's loop by mopd/dynamic_sampling.py's GroupScorer, so a
batch arrives scored. A weight push pauses the engines' sequences and resumes them on the new version;
a checkpoint holds the scheduler's groups and sequences in flight (mopd/checkpoint.py), taken at the same
instant as the data streams' position, so that resume repeats and loses no prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from mopd.checkpoint import read_scheduler_state, write_scheduler_state
from mopd.config import JobConfig
from mopd.core.types import Sample
from mopd.data import DataScheduler
from mopd.dynamic_sampling import GroupScorer
from mopd.teachers import TeacherSet


def staleness(samples: list[Sample], policy_version: int) -> dict[str, float]:
    """`rollout/staleness_mean|max`: policy_version minus the weight version that sampled each loss-mask token."""
    ages = [policy_version - version for s in samples for mask, version in zip(s.loss_mask, s.weight_versions) if mask]
    return {"rollout/staleness_mean": sum(ages) / len(ages) if ages else 0.0,
            "rollout/staleness_max": float(max(ages, default=0))}


class SequenceRollout:
    """One SequenceScheduler for the whole job: its sequences live across steps (and, continuous, run all the time)."""

    def __init__(self, scheduler: Any, scorer: GroupScorer, data: DataScheduler, *, continuous: bool) -> None:
        self.scheduler = scheduler  # rollout.scheduler.SequenceScheduler
        self.scorer = scorer
        self.data = data
        self.continuous = continuous
        self.version = 0  # the weights the engines hold
        self.stats: dict[str, float] = {}  # the last batch's

    @classmethod
    def create(cls, job: JobConfig, rollout: Any, data: DataScheduler, teachers: TeacherSet) -> SequenceRollout:
        """The scheduler over `rollout` (a RolloutManager) drawing groups from `data`; continuous for loop=overlap."""
        from rollout.scheduler import SequenceScheduler

        scorer = GroupScorer(data, teachers if job.uses_teachers else None, job.dynamic_sampling,
                             teacher_top_k=job.algo.teacher_top_k)
        continuous = job.loop == "overlap"
        limit = job.dynamic_sampling.max_filtered_batches * job.rollout.prompts_per_step
        scheduler = SequenceScheduler(rollout, data, job.rollout, group_hook=scorer, continuous=continuous,
                                      max_filtered_per_batch=limit)
        return cls(scheduler, scorer, data, continuous=continuous)

    def start(self, weight_version: int, checkpoint: Path | None = None) -> None:
        """Start generating on `weight_version`; from a checkpoint, its groups in flight come first."""
        state = read_scheduler_state(checkpoint) if checkpoint is not None else None
        if state is not None:
            self.scheduler.load_state_dict(state)
        self.version = weight_version
        self.scheduler.start(weight_version)

    def generate(self, num_groups: int, policy_version: int) -> list[Sample]:
        """The next `num_groups` accepted groups, scored; their staleness measured against `policy_version`."""
        batch = self.scheduler.next_batch(num_groups, policy_version)
        samples = batch.samples
        self.stats = {**batch.stats, **staleness(samples, policy_version)}
        return samples

    def metrics(self) -> dict[str, float]:
        """The last batch's scheduler statistics and staleness, and the pass rates scored since the last call."""
        return {**self.stats, **self.scorer.metrics()}

    @contextmanager
    def paused(self, weight_version: int) -> Iterator[None]:
        """Engines' sequences paused inside (a weight push, a checkpoint), resumed on `weight_version` after."""
        self.scheduler.pause()
        try:
            yield
        finally:
            self.scheduler.resume(weight_version)
            self.version = weight_version

    def save(self, path: Path) -> dict[str, Any]:
        """Write the scheduler's state into the step directory; return the data streams' state of that instant."""
        with self.paused(self.version) if self.continuous else nullcontext():
            write_scheduler_state(path, self.scheduler.state_dict())
            return self.data.state_dict()

    def close(self) -> None:
        self.scheduler.close()


def weights_pushed(sequences: SequenceRollout | None, weight_version: int) -> Any:
    """The context a weight push runs in: the scheduler paused and resumed on the new version, if there is one."""
    return sequences.paused(weight_version) if sequences is not None else nullcontext()

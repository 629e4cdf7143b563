"""Scoring each finished group as the sequence scheduler completes it, and dynamic sampling's verdict.

The scheduler (rollout/scheduler.py) awaits `GroupScorer` on its own event loop as each prompt group
finishes, so verifier and teacher scoring overlap the generation of the other groups. A group with no
learning signal is filtered (the scheduler counts it and draws a replacement):

    GRPO:  every reward in the group equal               -> advantage 0 for every sample
    MOPD:  and the group's mean teacher reverse KL per token, mean_t [log mu(y_t) - log pi_T(y_t)]
           over loss-mask tokens, below dynamic_sampling.filter_kl_threshold -> nothing left to distil

Every scored group's rewards also go to the data scheduler's per-prompt pass rates (mopd/data.py).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from mopd.config import DynamicSamplingConfig
from mopd.core.types import Sample
from mopd.data import DataScheduler
from mopd.rewards import score_outcomes
from mopd.teachers import TeacherSet
from rollout.teacher_scoring import KeptDispatchers, kept_dispatchers

log = logging.getLogger(__name__)
WARN_EVERY = 500  # consecutive filtered groups between warnings that a batch may never fill


def group_reverse_kl(group: list[Sample]) -> float | None:
    """Mean over the group's loss-mask tokens of log mu(y_t) - log pi_T(y_t); None without teacher scores."""
    total, count = 0.0, 0
    for sample in group:
        if sample.teacher_logprobs is None:
            continue
        for mask, mu, teacher in zip(sample.loss_mask, sample.rollout_logprobs, sample.teacher_logprobs):
            if mask:
                total += mu - teacher
                count += 1
    return total / count if count else None


def has_signal(group: list[Sample], uses_teachers: bool, kl_threshold: float) -> bool:
    """Whether training on the group can move the policy (the module docstring's rule)."""
    if len({s.reward for s in group}) > 1:
        return True
    if not uses_teachers:
        return False
    kl = group_reverse_kl(group)
    return kl is not None and kl >= kl_threshold


class GroupScorer:
    """The GroupHook of rollout/scheduler.py: score a finished group, record it, and keep it or filter it."""

    def __init__(self, data: DataScheduler, teachers: TeacherSet | None, cfg: DynamicSamplingConfig, *,
                 teacher_top_k: int = 0) -> None:
        self.data = data
        self.teachers = teachers  # None when the loss has no teacher term
        self.cfg = cfg
        self.teacher_top_k = teacher_top_k
        self._rewards: dict[str, list[float]] = defaultdict(list)  # domain -> rewards scored since `metrics`
        self._lock = threading.Lock()  # the scheduler's thread scores while the driver reads metrics
        self._filtered_in_a_row = 0
        self._connections = KeptDispatchers()  # the teachers' connections, kept from group to group

    async def __call__(self, group: list[Sample]) -> bool:
        score_outcomes(group)
        if self.teachers is not None:
            token = kept_dispatchers.set(self._connections)
            try:
                await self.teachers.score(group, top_k=self.teacher_top_k)
            finally:
                kept_dispatchers.reset(token)
        self.data.record_outcomes(group)
        with self._lock:
            for sample in group:
                self._rewards[sample.domain].append(sample.reward)
        keep = not self.cfg.filter_groups or has_signal(group, self.teachers is not None, self.cfg.filter_kl_threshold)
        self._filtered_in_a_row = 0 if keep else self._filtered_in_a_row + 1
        if self._filtered_in_a_row and self._filtered_in_a_row % WARN_EVERY == 0:
            log.warning("dynamic sampling filtered the last %d groups (equal rewards, teacher reverse KL below "
                        "dynamic_sampling.filter_kl_threshold=%g): the batch may never fill; lower the threshold "
                        "or set dynamic_sampling.filter_groups=false", self._filtered_in_a_row,
                        self.cfg.filter_kl_threshold)
        return keep

    async def aclose(self) -> None:
        """On the scheduler's loop, as it closes: the teachers' kept connections."""
        await self._connections.close()

    def metrics(self) -> dict[str, float]:
        """`rollout/pass_rate/<domain>`: mean reward of every group scored since the last call, the filtered
        ones included (what the sampler saw, where rollout/reward/<domain> is what was trained on)."""
        with self._lock:
            rewards, self._rewards = self._rewards, defaultdict(list)
        return {f"rollout/pass_rate/{domain}": sum(r) / len(r) for domain, r in sorted(rewards.items())}

"""Outcome rewards for single-turn verifiable domains, and the GRPO advantages built from them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from envs.toy_tasks import domain_verifier
from mopd.core.algo import AdvantageConfig, grpo_advantages
from mopd.core.types import Sample

Verifier = Callable[[str, Any], float]  # (response text, label) -> reward


def verifier_for(domain: str) -> Verifier:
    """The verifier of a single-turn domain: exact match against its label, after applying `!` corrections
    in the domains whose grammar allows them (envs/toy_tasks.py); multi-turn episodes are graded by their env."""
    return domain_verifier(domain)


def score_outcomes(samples: list[Sample]) -> None:
    """Fill `sample.reward`; an aborted response earns nothing. An episode (rollout/agent_loop.py's tool
    loop sets `metadata["env_reward"]`) keeps the reward its environment graded, or 0 when a limit cut
    it before the environment could grade it; the verifier scores only single-turn answers."""
    for sample in samples:
        if sample.finish_reason == "abort":
            sample.reward = 0.0
        elif "env_reward" in sample.metadata:
            if not sample.metadata["env_reward"]:
                sample.reward = 0.0
        elif sample.label is None:
            sample.reward = 0.0
        else:
            sample.reward = float(verifier_for(sample.domain)(sample.response_text, sample.label))


def assign_orm_advantages(samples: list[Sample], cfg: AdvantageConfig) -> None:
    """GRPO outcome advantage per sample, normalised within its prompt group."""
    if not samples:
        return
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    groups = torch.tensor([s.group_index for s in samples])
    for sample, adv in zip(samples, grpo_advantages(rewards, groups, normalize_std=cfg.grpo_normalize_std,
                                                    eps=cfg.grpo_eps).tolist()):
        sample.orm_advantage = adv

"""Outcome rewards for single-turn verifiable domains, and the GRPO advantages built from them."""

from __future__ import annotations

from typing import Any, Callable

import torch

from envs.toy_tasks import TOY_DOMAINS, exact_match_reward
from mopd.core.algo import AdvantageConfig, grpo_advantages
from mopd.core.types import Sample

Verifier = Callable[[str, Any], float]  # (response text, label) -> reward
_VERIFIERS: dict[str, Verifier] = {domain: exact_match_reward for domain in TOY_DOMAINS}


def register_verifier(domain: str, verifier: Verifier) -> None:
    """Reward responses of `domain` with `verifier(response_text, label)`."""
    _VERIFIERS[domain] = verifier


def verifier_for(domain: str) -> Verifier:
    """Domains without a registered verifier fall back to exact match against the label."""
    return _VERIFIERS.get(domain, exact_match_reward)


def score_outcomes(samples: list[Sample]) -> None:
    """Fill `sample.reward`; an aborted response (cut at a step boundary) earns nothing."""
    for sample in samples:
        if sample.finish_reason == "abort" or sample.label is None:
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

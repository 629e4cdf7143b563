"""MOPD advantages and the training/inference importance mask (MiMo-V2-Flash report, eqs. 5-9).

Per response token t of a sample whose prompt belongs to teacher T:

    A_t = sg[ log pi_T(y_t) - log pi_theta(y_t) ] * teacher_coef * coef_T + alpha * A_ORM
    w_t = sg[ pi_theta(y_t) / mu(y_t) ]   if eps_low <= pi_theta/mu <= eps_high, else 0

A_ORM is the GRPO outcome advantage of the sample within its prompt group; teacher_coef is
algo.teacher_coef and coef_T the scoring teacher's own teachers.T.coef (1 unless set). Tokens with
loss_mask == 0 (tool output, padding) get A_t = 0 and w_t = 0. These are pure tensor functions:
the trainer calls them inside its loss with the freshly computed log pi_theta, and the tests
check them against values computed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mopd.core.errors import ConfigError

DIVERGENCES = ("reverse_kl", "forward_kl")


@dataclass
class AdvantageConfig:
    alpha: float = 1.0  # weight of the outcome-reward (GRPO) advantage; 0 = pure distillation
    teacher_coef: float = 1.0  # weight of the dense teacher term; 0 = pure GRPO
    grpo_normalize_std: bool = True  # divide by the group's reward std (GRPO); False = Dr.GRPO style
    grpo_eps: float = 1e-6
    # clamp the per-token dense reward log pi_T - log pi_theta to [-clip, clip]; 0 = unbounded.
    # A sharp teacher gives a sampled wrong token a reward near -15, and a few such tokens dominate
    # the gradient; bounding them trades a little bias for much lower variance.
    teacher_reward_clip: float = 0.0
    # 0: the dense term is the sampled token's reward log pi_T(y_t) - log pi_theta(y_t) (MiMo report, eq. 7).
    # k > 0: the teacher also returns its k most likely tokens at every response position, and the dense
    # term becomes a divergence between the two distributions over those k tokens plus one "rest" bucket,
    # differentiated exactly instead of estimated from the one sampled token (lower variance).
    teacher_top_k: int = 0
    top_k_divergence: str = "reverse_kl"  # reverse_kl: KL(pi_theta || pi_T) | forward_kl: KL(pi_T || pi_theta)

    def validate(self, prefix: str = "algo") -> None:
        if self.alpha < 0:
            raise ConfigError(f"{prefix}.alpha", "a number >= 0", self.alpha)
        if self.teacher_coef < 0:
            raise ConfigError(f"{prefix}.teacher_coef", "a number >= 0", self.teacher_coef)
        if self.teacher_top_k < 0:
            raise ConfigError(f"{prefix}.teacher_top_k", "an integer >= 0 (0 = sampled-token reward)",
                              self.teacher_top_k)
        if self.top_k_divergence not in DIVERGENCES:
            raise ConfigError(f"{prefix}.top_k_divergence", f"one of {DIVERGENCES}", self.top_k_divergence)
        if self.teacher_reward_clip < 0:
            raise ConfigError(f"{prefix}.teacher_reward_clip", "a number >= 0 (0 = unbounded)",
                              self.teacher_reward_clip)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised outcome advantage: (r - mean_group) / (std_group + eps).

    A group whose rewards are all equal carries no signal and gets advantage 0. The std is the
    unbiased one, as in the GRPO paper; a group of one sample gets 0.
    """
    rewards = rewards.to(torch.float64)
    advantages = torch.zeros_like(rewards)
    for gid in torch.unique(group_ids):
        idx = group_ids == gid
        group = rewards[idx]
        centered = group - group.mean()
        if normalize_std:
            std = group.std(unbiased=True) if group.numel() > 1 else torch.zeros((), dtype=group.dtype)
            centered = centered / (std + eps)
        advantages[idx] = centered
    return advantages.to(torch.float32)


def token_advantages(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                     orm_advantage: torch.Tensor | float, loss_mask: torch.Tensor, *, alpha: float,
                     teacher_coef: float | torch.Tensor = 1.0, reward_clip: float = 0.0) -> torch.Tensor:
    """A_t for one or more sequences (any matching shape); no gradient flows through it.

    `teacher_coef` may be a tensor broadcasting against the tokens (e.g. [B, 1]: one coefficient per
    sequence, the product of algo.teacher_coef and the scoring teacher's teachers.NAME.coef)."""
    reverse_kl_reward = (teacher_logprobs - student_logprobs).detach()
    if reward_clip > 0:
        reverse_kl_reward = reverse_kl_reward.clamp(-reward_clip, reward_clip)
    advantages = teacher_coef * reverse_kl_reward + alpha * torch.as_tensor(orm_advantage)
    return advantages * loss_mask.to(advantages.dtype)


def importance_weights(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                       *, eps_low: float, eps_high: float) -> torch.Tensor:
    """w_t = pi_theta/mu inside [eps_low, eps_high], else 0 (masked, not clipped); detached."""
    ratio = torch.exp((logprobs - rollout_logprobs).detach())
    keep = (ratio >= eps_low) & (ratio <= eps_high) & loss_mask.bool()
    return torch.where(keep, ratio, torch.zeros_like(ratio))


def per_sequence_token_mean(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(1/|y|) sum_t values_t over the masked tokens of one sequence; |y| counts loss-mask tokens."""
    mask = loss_mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def top_k_divergence(student_top_logprobs: torch.Tensor, teacher_top_logprobs: torch.Tensor, *,
                     kind: str = "reverse_kl") -> torch.Tensor:
    """Per-position divergence between student and teacher over the teacher's top-k tokens plus a "rest" bucket.

    Inputs are [..., k] log-probabilities of the same k token ids under each model (the student's keep
    their gradient). The bucket holds each model's remaining mass, so a student cannot lower the divergence
    by moving mass off the teacher's top k; with k = vocabulary size it is the exact per-token KL.
    """
    student = _with_rest_bucket(student_top_logprobs)
    teacher = _with_rest_bucket(teacher_top_logprobs.detach())
    if kind == "reverse_kl":
        return (student.exp() * (student - teacher)).sum(-1)
    if kind == "forward_kl":
        return (teacher.exp() * (teacher - student)).sum(-1)
    raise ValueError(f"top_k_divergence: kind={kind!r}; expected one of {DIVERGENCES}")


def _with_rest_bucket(top_logprobs: torch.Tensor) -> torch.Tensor:
    rest = (1.0 - top_logprobs.exp().sum(-1, keepdim=True)).clamp(min=1e-8).log()
    return torch.cat([top_logprobs, rest], dim=-1)

"""MOPD advantages and the training/inference importance mask (MiMo-V2-Flash report, eqs. 5-9).

Per response token t of a sample whose prompt belongs to teacher T:

    A_t = sg[ log pi_T(y_t) - log pi_theta(y_t) ] * teacher_coef * coef_T + alpha * A_ORM
    w_t = sg[ pi_theta(y_t) / mu(y_t) ]   if eps_low <= pi_theta/mu <= eps_high, else 0   (algo.is_correction=mask)
    w_t = sg[ min(pi_theta(y_t) / mu(y_t), eps_high) ]                                    (algo.is_correction=truncate)
    w_t = 0 whenever the token is more than algo.max_token_staleness weight versions old (-1 = no bound)

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
from mopd.core.types import TokenScores

DIVERGENCES = ("reverse_kl", "forward_kl")
IS_CORRECTIONS = ("mask", "truncate")


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
    # < 1 sharpens each teacher to pi_T^(1/tau) / Z before it scores: a token the teacher half-believes (a slip it
    # makes itself now and then) is charged ~1/tau times more, and the student's optimum becomes the sharpened
    # teacher, which can be more accurate than the teacher's own samples. Z is summed over the teacher's
    # teacher_temperature_support most likely tokens plus a bound on the rest (sharpen_teacher_scores).
    teacher_temperature: float = 1.0
    teacher_temperature_support: int = 20
    top_k_divergence: str = "reverse_kl"  # reverse_kl: KL(pi_theta || pi_T) | forward_kl: KL(pi_T || pi_theta)
    # how the behaviour-policy weight w_t = pi_theta/mu is bounded (see importance_weights): mask (MiMo report:
    # tokens outside [trainer.eps_low, trainer.eps_high] get 0) | truncate (min(ratio, trainer.eps_high), no token
    # zeroed: truncated IS)
    is_correction: str = "mask"
    # tokens sampled more than this many weight versions before the policy being trained get w_t = 0 (-1 = no
    # bound); a second guard behind the rollout scheduler's rollout.max_staleness, per token instead of per sequence
    max_token_staleness: int = -1

    def validate(self, prefix: str = "algo") -> None:
        if self.alpha < 0:
            raise ConfigError(f"{prefix}.alpha", "a number >= 0", self.alpha)
        if self.teacher_coef < 0:
            raise ConfigError(f"{prefix}.teacher_coef", "a number >= 0", self.teacher_coef)
        if self.teacher_top_k < 0:
            raise ConfigError(f"{prefix}.teacher_top_k", "an integer >= 0 (0 = sampled-token reward)",
                              self.teacher_top_k)
        if not 0 < self.teacher_temperature <= 1:  # also rejects NaN
            raise ConfigError(f"{prefix}.teacher_temperature", "a number in (0, 1] (1 = the teacher as it is; above 1 "
                              "the sharpened normaliser's tail cannot be bounded from the top tokens)",
                              self.teacher_temperature)
        if isinstance(self.teacher_temperature_support, bool) or not isinstance(self.teacher_temperature_support, int) \
                or self.teacher_temperature_support < 1:
            raise ConfigError(f"{prefix}.teacher_temperature_support", "an integer >= 1 (the teacher tokens summed "
                              "exactly in the sharpened normaliser)", self.teacher_temperature_support)
        if self.top_k_divergence not in DIVERGENCES:
            raise ConfigError(f"{prefix}.top_k_divergence", f"one of {DIVERGENCES}", self.top_k_divergence)
        if self.is_correction not in IS_CORRECTIONS:
            raise ConfigError(f"{prefix}.is_correction", f"one of {IS_CORRECTIONS}", self.is_correction)
        if isinstance(self.max_token_staleness, bool) or not isinstance(self.max_token_staleness, int) \
                or self.max_token_staleness < -1:
            raise ConfigError(f"{prefix}.max_token_staleness", "an integer >= 0, or -1 for no bound",
                              self.max_token_staleness)
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


# Why a per-token behaviour logprob is enough with partial rollout, and how this relates to decoupled PPO.
#
# A sequence continued across weight pushes has tokens from several versions: y_t was drawn from
# mu_t(. | y_<t), the distribution the engine sampled from at that moment, and rollout_logprobs[t] is that
# distribution's log-probability of y_t, recorded as it was sampled (rollout/trajectory.py). The sequence's
# behaviour probability is therefore prod_t mu_t(y_t | y_<t) whatever versions were involved, and the per-token
# ratio pi_theta(y_t | y_<t) / mu_t(y_t | y_<t) corrects each token choice for exactly the policy that made it.
# Nothing in the correction needs the version numbers: it does not even matter whether mu_t was "version v" in
# a clean sense (a continuation's prefix may have been prefilled under older weights); what matters is that
# rollout_logprobs holds the probability the sampler actually used. As in PPO, GRPO and the MiMo report, the
# estimator is token-level: it corrects each token choice, not the distribution of the prefix (the states).
# Staleness adds no new kind of error: the bias of that token-level approximation and the variance of the
# weights both grow with how far mu is from pi_theta, and older weights are further away. It shows as ratios
# far from 1, which the bounds below cut; hence the metrics by staleness (trainer/losses.py staleness_ratios)
# and the optional hard bound algo.max_token_staleness.
#
# Decoupled PPO (Hilton et al. 2021; AReaL) separates the behaviour policy mu from a proximal policy pi_prox,
# the weights at the start of the update:
#     J(theta) = E_{y ~ mu}[ sg(pi_prox / mu) * min(r_t A_t, clip(r_t, 1 - e, 1 + e) A_t) ],  r_t = pi_theta / pi_prox.
# Per token, where the min takes the unclipped branch (r_t inside [1 - e, 1 + e], or outside it on the side
# where r_t A_t is the smaller), the gradient is sg(pi_prox / mu) A_t grad r_t = sg(pi_prox / mu) r_t A_t
# grad log pi_theta = sg(pi_theta / mu) A_t grad log pi_theta: the gradient of -w_t A_t log pi_theta with the
# unbounded w_t = sg(pi_theta / mu), whatever pi_prox is. Where the clip binds (A_t > 0 and r_t > 1 + e, or
# A_t < 0 and r_t < 1 - e) the token gives no gradient. With one optimizer step per rollout batch, all
# microbatches accumulated before it (trainer/rank.py train_step), every gradient is taken at theta_prox, so
# r_t = 1 on every token, no clip binds and decoupled PPO's gradient is exactly the unbounded weight's. That
# needs the pi_prox of the ratio to equal the differentiated forward in value (same weights, routing replay,
# temperature): true by construction when pi_prox is that forward, detached; a separately recomputed pi_prox
# would add its numerical noise to r_t. With several optimizer steps per batch (PPO epochs or minibatches)
# pi_prox must be stored from a forward before the first one, and from the second step on the clip can bind
# and the two differ. The loss values differ in any case (-(pi_theta / mu) A vs -sg(w) A log pi_theta); only
# the gradients agree (tests/trainer/test_staleness_is.py checks both cases). So with one step per batch the
# decoupled objective adds nothing and its clip never acts; what stabilises training is how w_t is bounded:
# the mask drops tokens whose ratio leaves [eps_low, eps_high] (they give no gradient, the kept ones are
# weighted exactly); truncated IS (as in verl and slime, C = eps_high here) keeps every token with
# min(ratio, C), which bounds the variance at the cost of a bias against tokens the trainer now prefers over
# the sampler, and keeps the small-ratio tokens the mask would drop. For the top-k divergence term (pg_loss in
# trainer/losses.py) D_t depends on the prefix only, not on y_t, so there w_t acts as this trust-region mask
# rather than as a correction.
def importance_weights(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                       *, eps_low: float, eps_high: float, correction: str = "mask",
                       staleness: torch.Tensor | None = None, max_staleness: int = -1) -> torch.Tensor:
    """The behaviour-policy weight w_t (detached); 0 on tokens outside the loss mask.

    mask: pi_theta/mu inside [eps_low, eps_high], else 0 (masked, not clipped). truncate: min(pi_theta/mu,
    eps_high), eps_low unused. `staleness` (same shape, versions between the trained policy and the one that
    sampled the token) with `max_staleness` >= 0 zeroes tokens staler than that in either mode."""
    ratio = torch.exp((logprobs - rollout_logprobs).detach())
    keep = loss_mask.bool()
    if correction == "mask":
        keep = keep & (ratio >= eps_low) & (ratio <= eps_high)
    elif correction == "truncate":
        ratio = ratio.clamp(max=eps_high)
    else:
        raise ValueError(f"importance_weights: correction={correction!r}; expected one of {IS_CORRECTIONS}")
    if staleness is not None and max_staleness >= 0:
        keep = keep & (staleness <= max_staleness)
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


def sharpen_teacher_scores(scores: TokenScores, temperature: float, keep_top_k: int = 0) -> TokenScores:
    """A teacher's scores under its sharpened distribution pi^(1/tau) / Z (algo.teacher_temperature = tau <= 1).

    An engine's prefill logprobs are untempered (SGLang computes input logprobs with a plain log_softmax), and
    one token's logprob does not give the tempered one: that needs Z = sum_v pi(v)^(1/tau) over the vocabulary.
    So the teacher is asked for its top tokens at every position (algo.teacher_temperature_support of them) and
    Z is summed exactly over those. Every other token has p <= p_min, the least likely of them, so together they
    add at most (1 - sum_top p) * p_min^(1/tau - 1); that bound is added to Z, which errs on the side of the
    sharpened teacher keeping a little too much mass off its top tokens, never too little. With the top 20 tokens
    of the anagram/shuffle toy teachers (benchmarks/long_answers) the bound is at most 8e-5 of Z at tau = 0.25 and
    up to 0.07 at tau = 0.5, where a teacher is unsure between many tokens: a flatter teacher or a milder tau wants
    a larger support. At tau = 1 the scores are returned unchanged.

    log pi_tau(v) = log pi(v) / tau - log Z for the sampled tokens and for the first `keep_top_k` top tokens
    (0: no top tokens are returned, as for the sampled-token reward).
    """
    if temperature == 1.0:
        return scores
    if scores.top_logprobs is None or scores.top_ids is None or len(scores.top_logprobs) != len(scores.logprobs):
        raise ValueError("sharpen_teacher_scores: algo.teacher_temperature < 1 needs the teacher's top tokens at "
                         f"every response position; got {None if scores.top_logprobs is None else len(scores.top_logprobs)}"
                         f" rows for {len(scores.logprobs)} positions")
    n = len(scores.logprobs)
    if n == 0:
        return TokenScores(logprobs=[], top_ids=[] if keep_top_k else None, top_logprobs=[] if keep_top_k else None)
    width = max(1, max(len(row) for row in scores.top_logprobs))
    top = torch.full((n, width), float("-inf"), dtype=torch.float64)
    for i, row in enumerate(scores.top_logprobs):
        top[i, :len(row)] = torch.tensor(row, dtype=torch.float64)
    inv = 1.0 / temperature
    rest = (1.0 - top.exp().sum(-1)).clamp(min=0.0)
    least = torch.where(torch.isinf(top), torch.full_like(top, float("inf")), top).min(-1).values
    tail = torch.where(rest > 0, rest.log() + (inv - 1.0) * least.clamp(max=0.0), torch.full_like(rest, float("-inf")))
    log_z = torch.logaddexp(torch.logsumexp(top * inv, dim=-1), tail)
    logprobs = torch.tensor(scores.logprobs, dtype=torch.float64) * inv - log_z
    if not keep_top_k:
        return TokenScores(logprobs=logprobs.tolist())
    return TokenScores(logprobs=logprobs.tolist(), top_ids=[row[:keep_top_k] for row in scores.top_ids],
                       top_logprobs=[(torch.tensor(row[:keep_top_k], dtype=torch.float64) * inv - log_z[i]).tolist()
                                     for i, row in enumerate(scores.top_logprobs)])

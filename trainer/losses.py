"""Training losses: MOPD policy gradient, GRPO and SFT, on per-token log pi_theta, in a registry.

`trainer.loss` names a loss registered here with `register_loss`; each entry declares the inputs it
needs, from which the job knows whether to start and score teachers and the trainer which Sample fields
to require. All losses return the SUM over sequences of the per-sequence loss; the caller divides by the
number of sequences in the whole (all data-parallel ranks) batch, so the gradient is that of
L = -mean_seq((1/|y|) sum_t ...) no matter how sequences are split into microbatches and ranks.
The MOPD math itself lives in mopd.core.algo; this module only wires it to the trainer's tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mopd.core.algo import (
    AdvantageConfig,
    importance_weights,
    per_sequence_token_mean,
    token_advantages,
    top_k_divergence,
)
from mopd.core.errors import ConfigError


@dataclass
class LossInputs:
    """Per-token tensors [B, N] aligned with the logprobs (N = positions that predict a token)."""

    loss_mask: torch.Tensor  # 1 on response tokens that are trained on
    rollout_logprobs: torch.Tensor | None = None  # log mu
    teacher_logprobs: torch.Tensor | None = None  # log pi_teacher
    orm_advantage: torch.Tensor | None = None  # [B]
    teacher_top_ids: torch.Tensor | None = None  # [B, N, k] algo.teacher_top_k: the teacher's top-k token ids
    teacher_top_logprobs: torch.Tensor | None = None  # [B, N, k] their log pi_teacher
    # [B] per-sequence multiplier of the teacher term: teachers.NAME.coef of the teacher that scored it
    teacher_coef: torch.Tensor | None = None
    # [B, N] int64: weight versions between the policy being trained and the one that sampled each token
    # (trainer/batching.py token_staleness); None = all 0
    staleness: torch.Tensor | None = None


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # sum over sequences of the per-sequence loss (has grad)
    is_masked_tokens: float  # loss-mask tokens the IS mask zeroed
    kl_rollout_sum: float  # sum over loss-mask tokens of log mu - log pi_theta
    mask_tokens: float
    # further ratio metrics of the loss: name -> (numerator, denominator), summed over microbatches and ranks
    # and logged as train/<name> = sum(numerator) / sum(denominator) (trainer/rank.py)
    ratios: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class LossContext:
    """What a loss may read besides the student's logprobs and the batch: the algorithm's settings and the
    student's other views of the microbatch (trainer/losses.py: StudentLogprobs)."""

    adv: AdvantageConfig
    eps_low: float  # trainer.eps_low / eps_high: the IS mask's bounds (eps_high: the truncation cap)
    eps_high: float
    student_top_logprobs: torch.Tensor | None = None  # [B, N, k] log pi_theta^1 of the teacher's top-k tokens
    untempered_logprobs: torch.Tensor | None = None  # [B, N] log pi_theta^1(y_t)


LossFn = Callable[[torch.Tensor, LossInputs, LossContext], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and the inputs it needs."""

    name: str
    fn: LossFn
    needs_teacher: bool  # a teacher term: teachers score every sample (when algo.teacher_coef > 0)
    needs_rollout_logprobs: bool  # log mu of every response token (the IS mask)


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, needs_teacher: bool = False,
                  needs_rollout_logprobs: bool = False) -> Callable[[LossFn], LossFn]:
    """Make `trainer.loss=name` train with the decorated function (logprobs [B, N], inputs, context) ->
    LossOutput. A loss registered outside this module must be imported in the trainer's processes too."""

    def decorator(fn: LossFn) -> LossFn:
        _LOSSES[name] = LossSpec(name, fn, needs_teacher, needs_rollout_logprobs)
        return fn

    return decorator


def known_losses() -> tuple[str, ...]:
    return tuple(_LOSSES)


def loss_spec(name: str) -> LossSpec:
    """The registered loss `name`; an unknown name is a config error naming trainer.loss."""
    if name not in _LOSSES:
        raise ConfigError("trainer.loss", f"one of {known_losses()}", name)
    return _LOSSES[name]


def needed_fields(name: str, adv: AdvantageConfig) -> tuple[str, ...]:
    """Per-token Sample fields the loss reads: log mu if it needs it, and the teacher's scores when its
    teacher term is on (sampled-token logprobs, or the top-k tokens with algo.teacher_top_k > 0)."""
    spec = loss_spec(name)
    fields = ("rollout_logprobs",) if spec.needs_rollout_logprobs else ()
    if spec.needs_teacher and adv.teacher_coef > 0:
        fields += ("teacher_top_ids", "teacher_top_logprobs") if adv.teacher_top_k > 0 else ("teacher_logprobs",)
    return fields


def _require(value: torch.Tensor | None, name: str, loss: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"loss={loss!r} needs Sample.{name} on every sample (got None)")
    return value


def _rollout_stats(logprobs: torch.Tensor, inputs: LossInputs) -> tuple[float, float]:
    mask = inputs.loss_mask.to(logprobs.dtype)
    if inputs.rollout_logprobs is None:
        return 0.0, 0.0
    kl = ((inputs.rollout_logprobs - logprobs.detach()) * mask).sum().item()
    return kl, float(mask.sum().item())


def pg_loss(logprobs: torch.Tensor, inputs: LossInputs, adv: AdvantageConfig, *, eps_low: float,
            eps_high: float, teacher_coef: float, student_top_logprobs: torch.Tensor | None = None,
            untempered_logprobs: torch.Tensor | None = None) -> LossOutput:
    """-sum_seq (1/|y|) sum_t w_t (A_t log pi_theta(y_t) - teacher_coef * c_seq * D_t); w_t the behaviour weight.

    w_t = sg(pi_theta / mu) bounded by algo.is_correction (mask: 0 outside [eps_low, eps_high]; truncate:
    min(., eps_high)) and 0 for tokens staler than algo.max_token_staleness (mopd.core.algo.importance_weights,
    where the comment above it says why per-token mu makes sequences mixed from several weight versions correct).
    A zeroed token still counts in |y|: the weight removes its gradient, not its share of the sequence.

    Temperature. `logprobs` are the student's at the rollout temperature T (what mu sampled from), so the
    IS weight w_t = pi_theta^T / mu and the policy-gradient term use them. The teacher term compares the
    two models' own distributions at temperature 1: A_t's reward is log pi_T(y_t) - log pi_theta^1(y_t)
    (`untempered_logprobs`), and D_t uses the student's untempered top-k logprobs. Why 1 and not T: a
    teacher's prefill logprobs are untempered in SGLang (sglang 0.5.23 computes input logprobs with a plain
    log_softmax; only output logprobs are tempered), and a tempered teacher logprob cannot be recovered
    from one token's logprob (it needs log sum_v p_v^(1/T) over the vocabulary), so comparing at T would
    compare a tempered student with an untempered teacher. At T = 1 (the default) both views coincide.

    `teacher_coef` is algo.teacher_coef; c_seq (inputs.teacher_coef, default 1) is the per-teacher
    teachers.NAME.coef of the teacher that scored the sequence, so each teacher's term is scaled on its own.

    With sampled-token teacher rewards (algo.teacher_top_k = 0) the teacher term is inside A_t and D_t = 0;
    with top-k teacher distributions A_t is the outcome term alone and D_t the top-k divergence, whose
    gradient flows through the student's logprobs of the teacher's top-k tokens (student_top_logprobs).
    """
    mask = inputs.loss_mask.to(logprobs.dtype)
    mu = _require(inputs.rollout_logprobs, "rollout_logprobs", "mopd/grpo")
    orm = _require(inputs.orm_advantage, "orm_advantage", "mopd/grpo").to(logprobs.dtype)
    top_k = teacher_coef > 0 and adv.teacher_top_k > 0
    if teacher_coef > 0 and not top_k:
        teacher = _require(inputs.teacher_logprobs, "teacher_logprobs", "mopd")
    else:
        teacher = torch.zeros_like(logprobs)
    per_seq_coef = (inputs.teacher_coef.to(logprobs.dtype).unsqueeze(-1) if inputs.teacher_coef is not None
                    else torch.ones_like(orm).unsqueeze(-1))
    sampled_coef = 0.0 if top_k else teacher_coef
    student = untempered_logprobs if untempered_logprobs is not None else logprobs
    advantages = token_advantages(teacher, student.detach(), orm.unsqueeze(-1), mask, alpha=adv.alpha,
                                  teacher_coef=sampled_coef * per_seq_coef, reward_clip=adv.teacher_reward_clip)
    weights = importance_weights(logprobs, mu, mask, eps_low=eps_low, eps_high=eps_high,
                                 correction=adv.is_correction, staleness=inputs.staleness,
                                 max_staleness=adv.max_token_staleness)
    objective = weights * advantages * logprobs
    if top_k:
        teacher_top = _require(inputs.teacher_top_logprobs, "teacher_top_logprobs", "mopd with teacher_top_k")
        if student_top_logprobs is None:
            raise ValueError("pg_loss with algo.teacher_top_k > 0 needs the student's logprobs of the teacher's "
                             "top-k tokens")
        divergence = top_k_divergence(student_top_logprobs, teacher_top.to(logprobs.dtype),
                                      kind=adv.top_k_divergence)
        objective = objective - teacher_coef * per_seq_coef * weights * divergence * mask
    per_seq = per_sequence_token_mean(objective, mask)
    kl, _ = _rollout_stats(logprobs, inputs)
    return LossOutput(loss_sum=-per_seq.sum(), is_masked_tokens=float(((weights == 0) & (mask > 0)).sum().item()),
                      kl_rollout_sum=kl, mask_tokens=float(mask.sum().item()),
                      ratios=staleness_ratios(weights, mask, inputs.staleness, mu - logprobs.detach()))


_STALENESS_BUCKETS = ("0", "1", "2plus")


def staleness_ratios(weights: torch.Tensor, mask: torch.Tensor, staleness: torch.Tensor | None,
                     log_mu_over_pi: torch.Tensor) -> dict[str, tuple[float, float]]:
    """The IS-masked fraction, the mean IS weight and the mean log mu - log pi_theta of the loss-mask tokens, by
    staleness (0, 1, 2 or more versions old): whether stale tokens are the ones the correction cuts
    (train/is_masked_frac/staleness_k, train/is_weight_mean/staleness_k), and how far the policy moved in k
    versions (train/kl_rollout/staleness_k, an estimate of KL(mu || pi_theta) per token). The last predicts what
    staleness costs: in benchmarks/scheduler one version of lag cost nothing measurable where it was ~0.002 nats
    per token over the first steps, and 0.05-0.1 nats of held-out reverse KL where it was 0.007-0.03."""
    on = mask > 0
    stale = staleness if staleness is not None else torch.zeros_like(weights, dtype=torch.long)
    buckets = (stale == 0, stale == 1, stale >= 2)
    ratios: dict[str, tuple[float, float]] = {}
    for name, bucket in zip(_STALENESS_BUCKETS, buckets):
        tokens = on & bucket
        count = float(tokens.sum().item())
        ratios[f"is_masked_frac/staleness_{name}"] = (float((tokens & (weights == 0)).sum().item()), count)
        ratios[f"is_weight_mean/staleness_{name}"] = (float(weights[tokens].sum().item()), count)
        ratios[f"kl_rollout/staleness_{name}"] = (float(log_mu_over_pi[tokens].sum().item()), count)
    return ratios


def sft_loss(logprobs: torch.Tensor, inputs: LossInputs) -> LossOutput:
    """Cross-entropy on loss-mask tokens: per-sequence token mean, summed over sequences."""
    mask = inputs.loss_mask.to(logprobs.dtype)
    per_seq = per_sequence_token_mean(-logprobs, mask)
    kl, _ = _rollout_stats(logprobs, inputs)
    return LossOutput(loss_sum=per_seq.sum(), is_masked_tokens=0.0, kl_rollout_sum=kl,
                      mask_tokens=float(mask.sum().item()))


@register_loss("mopd", needs_teacher=True, needs_rollout_logprobs=True)
def mopd_loss(logprobs: torch.Tensor, inputs: LossInputs, ctx: LossContext) -> LossOutput:
    """The MOPD loss (pg_loss with the teacher term at algo.teacher_coef)."""
    return pg_loss(logprobs, inputs, ctx.adv, eps_low=ctx.eps_low, eps_high=ctx.eps_high,
                   teacher_coef=ctx.adv.teacher_coef, student_top_logprobs=ctx.student_top_logprobs,
                   untempered_logprobs=ctx.untempered_logprobs)


@register_loss("grpo", needs_rollout_logprobs=True)
def grpo_loss(logprobs: torch.Tensor, inputs: LossInputs, ctx: LossContext) -> LossOutput:
    """pg_loss with the teacher term off: outcome advantages only."""
    return pg_loss(logprobs, inputs, ctx.adv, eps_low=ctx.eps_low, eps_high=ctx.eps_high, teacher_coef=0.0)


@register_loss("sft")
def _sft(logprobs: torch.Tensor, inputs: LossInputs, ctx: LossContext) -> LossOutput:
    return sft_loss(logprobs, inputs)


def compute_loss(kind: str, logprobs: torch.Tensor, inputs: LossInputs, adv: AdvantageConfig, *,
                 eps_low: float, eps_high: float, student_top_logprobs: torch.Tensor | None = None,
                 untempered_logprobs: torch.Tensor | None = None) -> LossOutput:
    """The registered loss `kind` (TrainerConfig.loss) on one microbatch."""
    ctx = LossContext(adv, eps_low, eps_high, student_top_logprobs, untempered_logprobs)
    return loss_spec(kind).fn(logprobs, inputs, ctx)


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                               top_ids: torch.Tensor | None = None,
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log p(target) [B, N], the entropy of the tempered distribution [B, N], and log p of `top_ids`
    [B, N, k] when given (the teacher's top-k tokens), all computed in fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    top_lp = logp.gather(-1, top_ids) if top_ids is not None else None
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return token_lp, entropy, top_lp


@dataclass
class StudentLogprobs:
    """The student's view of one microbatch: at the rollout temperature, and untempered for the teacher term."""

    tempered: torch.Tensor  # [B, N] log pi_theta^T(y_t): IS weight and policy gradient
    entropy: torch.Tensor  # [B, N] entropy of pi_theta^T
    untempered: torch.Tensor  # [B, N] log pi_theta^1(y_t): the teacher reward (the same tensor when T = 1)
    top: torch.Tensor | None  # [B, N, k] log pi_theta^1 of the teacher's top-k tokens (D_t)


def student_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     top_ids: torch.Tensor | None = None, need_untempered: bool = True) -> StudentLogprobs:
    """Both temperature views from one logits tensor; the second softmax is computed only when T != 1."""
    lp, ent, top = token_logprobs_and_entropy(logits, targets, temperature,
                                              top_ids if temperature == 1.0 else None)
    if temperature == 1.0 or not need_untempered:
        return StudentLogprobs(lp, ent, lp, top)
    lp1, _, top1 = token_logprobs_and_entropy(logits, targets, 1.0, top_ids)
    return StudentLogprobs(lp, ent, lp1, top1)

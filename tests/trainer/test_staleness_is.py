"""Staleness-aware importance sampling: a sequence continued across weight pushes (tokens from versions 3, 3, 4, 5,
trained at version 5) through the batching and the loss, with every number worked out by hand below."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.core.algo import AdvantageConfig
from mopd.core.errors import ConfigError
from mopd.core.types import Sample
from trainer.batching import collate, token_staleness
from trainer.losses import LossInputs, compute_loss

PROMPT = [11, 12, 13]
RESPONSE = [21, 22, 23, 24]
VERSIONS = [3, 3, 4, 5]  # trained at 5: staleness 2, 2, 1, 0
LP = [-0.5, -1.0, -2.0, -0.3]  # log pi_theta of the four response tokens
RATIOS = [3.0, 0.8, 0.25, 1.0]  # pi_theta / mu chosen per token; mu = lp - log(ratio)
ORM = 2.0  # GRPO loss with alpha = 1: A_t = 2 on every token
EPS_LOW, EPS_HIGH = 0.5, 2.0


def _sample(**metadata) -> Sample:
    return Sample(prompt_index=0, group_index=0, domain="math", prompt_ids=list(PROMPT), response_ids=list(RESPONSE),
                  loss_mask=[1, 1, 1, 1], rollout_logprobs=[lp - math.log(r) for lp, r in zip(LP, RATIOS)],
                  weight_versions=list(VERSIONS), orm_advantage=ORM, metadata=dict(metadata))


def _run(correction: str, max_staleness: int = -1):
    mb = collate([_sample(policy_version=5)], [0])
    start = len(PROMPT) - 1  # column p predicts token p + 1: the response starts at column 2
    values = torch.zeros(1, len(PROMPT) + len(RESPONSE) - 1)
    values[0, start:] = torch.tensor(LP)
    lp = values.clone().requires_grad_(True)
    adv = AdvantageConfig(alpha=1.0, teacher_coef=0.0, is_correction=correction, max_token_staleness=max_staleness)
    out = compute_loss("grpo", lp, mb.inputs, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    out.loss_sum.backward()
    return out, lp.grad[0, start:], mb


def test_batching_collates_staleness_from_weight_versions_and_policy_version():
    mb = collate([_sample(policy_version=5)], [0])
    assert mb.inputs.staleness.tolist() == [[0, 0, 2, 2, 1, 0]]  # prompt columns 0, response 5 - [3, 3, 4, 5]
    assert mb.inputs.staleness.dtype == torch.long
    # no policy_version (a driver without a scheduler) or no weight versions: every token counts as fresh
    assert token_staleness(_sample(), 0) == [0, 0, 0, 0]
    fresh = _sample(policy_version=5)
    fresh.weight_versions = []
    assert token_staleness(fresh, 0) == [0, 0, 0, 0]


def test_a_token_newer_than_the_trained_policy_or_a_bad_version_is_refused():
    with pytest.raises(ValueError, match=r"sample 7: Sample.weight_versions has version 5, newer than "
                                         r"metadata\['policy_version'\] = 4"):
        token_staleness(_sample(policy_version=4), 7)
    with pytest.raises(TypeError, match=r"sample 0: metadata\[.policy_version.\] must be an integer"):
        collate([_sample(policy_version="5")], [0])


def test_mask_correction_on_a_mixed_version_sequence_hand_computed():
    out, grad, _ = _run("mask")
    # ratios 3.0 (> eps_high) and 0.25 (< eps_low) are masked: w = [0, 0.8, 0, 1]
    # loss = -(1/4) sum_t w_t A lp_t = -(1/4) (0.8 * 2 * -1.0 + 1 * 2 * -0.3) = 2.2 / 4
    assert out.loss_sum.item() == pytest.approx(0.55, abs=1e-6)
    # d loss / d lp_t = -(1/4) w_t A = -0.5 w_t
    assert grad.tolist() == pytest.approx([0.0, -0.4, 0.0, -0.5], abs=1e-6)
    assert out.is_masked_tokens == 2.0 and out.mask_tokens == 4.0
    assert out.ratios["is_masked_frac/staleness_0"] == (0.0, 1.0)
    assert out.ratios["is_masked_frac/staleness_1"] == (1.0, 1.0)  # the 0.25 token
    assert out.ratios["is_masked_frac/staleness_2plus"] == (1.0, 2.0)  # the 3.0 token of the two version-3 ones
    assert out.ratios["is_weight_mean/staleness_0"] == pytest.approx((1.0, 1.0))
    assert out.ratios["is_weight_mean/staleness_1"] == pytest.approx((0.0, 1.0))
    assert out.ratios["is_weight_mean/staleness_2plus"] == pytest.approx((0.8, 2.0))
    # log mu - log pi_theta = -log(ratio), summed per bucket whatever the correction kept
    assert out.ratios["kl_rollout/staleness_0"] == pytest.approx((0.0, 1.0), abs=1e-6)
    assert out.ratios["kl_rollout/staleness_1"] == pytest.approx((math.log(4.0), 1.0))
    assert out.ratios["kl_rollout/staleness_2plus"] == pytest.approx((-math.log(3.0) - math.log(0.8), 2.0))


def test_truncate_correction_on_a_mixed_version_sequence_hand_computed():
    out, grad, _ = _run("truncate")
    # w = [min(3, 2), 0.8, 0.25, 1] = [2, 0.8, 0.25, 1]: nothing zeroed, eps_low plays no part
    # loss = -(1/4) * 2 * (2 * -0.5 + 0.8 * -1.0 + 0.25 * -2.0 + 1 * -0.3) = -(1/2) * -2.6
    assert out.loss_sum.item() == pytest.approx(1.3, abs=1e-6)
    assert grad.tolist() == pytest.approx([-1.0, -0.4, -0.125, -0.5], abs=1e-6)
    assert out.is_masked_tokens == 0.0
    assert out.ratios["is_masked_frac/staleness_2plus"] == (0.0, 2.0)
    assert out.ratios["is_weight_mean/staleness_2plus"] == pytest.approx((2.8, 2.0))
    assert out.ratios["is_weight_mean/staleness_1"] == pytest.approx((0.25, 1.0))
    assert out.ratios["is_weight_mean/staleness_0"] == pytest.approx((1.0, 1.0))


@pytest.mark.parametrize("correction, weights, masked", [
    ("mask", [0.0, 0.0, 0.0, 1.0], 3.0),  # the two version-3 tokens (staleness 2 > 1) join the 0.25 token
    ("truncate", [0.0, 0.0, 0.25, 1.0], 2.0),  # only the two version-3 tokens
])
def test_staleness_bound_zeroes_tokens_older_than_it_hand_computed(correction, weights, masked):
    out, grad, _ = _run(correction, max_staleness=1)
    # loss = -(1/4) * 2 * sum_t w_t lp_t; mask: -0.5 * (1 * -0.3) = 0.15; truncate: -0.5 * (0.25 * -2 - 0.3) = 0.4
    expected = -0.5 * sum(w * lp for w, lp in zip(weights, LP))
    assert expected == pytest.approx({"mask": 0.15, "truncate": 0.4}[correction])
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-6)
    assert grad.tolist() == pytest.approx([-0.5 * w for w in weights], abs=1e-6)
    assert out.is_masked_tokens == masked
    assert out.ratios["is_masked_frac/staleness_2plus"] == (2.0, 2.0)
    assert out.ratios["is_weight_mean/staleness_2plus"] == (0.0, 2.0)
    # bound 0: only the token sampled by the trained weights themselves remains
    out0, grad0, _ = _run(correction, max_staleness=0)
    assert out0.loss_sum.item() == pytest.approx(0.15, abs=1e-6)
    assert grad0.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.5], abs=1e-6)


def test_without_staleness_the_mask_loss_is_todays():
    """Samples without versions: staleness 0 everywhere, the bound has nothing to cut, all tokens in bucket 0."""
    mb = collate([_sample()], [0])
    lp = torch.zeros(1, 6)
    lp[0, 2:] = torch.tensor(LP)
    adv = AdvantageConfig(alpha=1.0, teacher_coef=0.0, max_token_staleness=0)
    out = compute_loss("grpo", lp, mb.inputs, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    assert out.loss_sum.item() == pytest.approx(0.55, abs=1e-6)
    assert out.ratios["is_masked_frac/staleness_0"] == (2.0, 4.0)
    assert out.ratios["is_masked_frac/staleness_2plus"] == (0.0, 0.0)


@pytest.mark.parametrize("kwargs, field", [
    ({"is_correction": "clip"}, "algo.is_correction"),
    ({"max_token_staleness": -2}, "algo.max_token_staleness"),
    ({"max_token_staleness": 1.5}, "algo.max_token_staleness"),
    ({"max_token_staleness": True}, "algo.max_token_staleness"),
])
def test_invalid_correction_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        AdvantageConfig(**kwargs).validate()
    assert err.value.field_name == field
    AdvantageConfig(is_correction="truncate", max_token_staleness=0).validate()


def test_job_config_accepts_the_settings_and_names_a_bad_one():
    from hydra import compose, initialize_config_module

    from mopd.config import register_configs, to_job_config

    register_configs()

    def job(*overrides: str):
        with initialize_config_module(config_module="configs", version_base=None):
            cfg = compose(config_name="config", overrides=["run_dir=/tmp/mopd-config-test", "experiment=dry_run",
                                                           *overrides])
        return to_job_config(cfg)

    algo = job("algo.is_correction=truncate", "algo.max_token_staleness=2").algo
    assert (algo.is_correction, algo.max_token_staleness) == ("truncate", 2)
    assert (job().algo.is_correction, job().algo.max_token_staleness) == ("mask", -1)
    with pytest.raises(ConfigError) as err:
        job("algo.is_correction=decoupled")
    assert err.value.field_name == "algo.is_correction"


def test_train_step_logs_the_masked_fraction_by_staleness(moe_path, dist_env):
    """Through a real trainer rank: versions reach the loss and come back as train/ metrics, one per bucket."""
    from tests.trainer.conftest import make_samples
    from trainer.config import TrainerConfig
    from trainer.rank import TrainerRank

    engine = TrainerRank(moe_path, TrainerConfig(), AdvantageConfig(alpha=0.5, max_token_staleness=1), num_steps=1)
    samples = make_samples(4, seed=5)
    lps = engine.compute_logprobs(samples)
    for i, s in enumerate(samples):
        s.rollout_logprobs = [float(x) for x in lps[i]]  # ratio 1: nothing outside the mask's band
        s.weight_versions = [7 - i] * len(s.response_ids)  # staleness 0, 1, 2, 3 by sample
        s.metadata["policy_version"] = 7
    metrics = engine.train_step(samples, len(samples))
    # ratio 1 everywhere: only the bound cuts, and it cuts exactly the samples 2 and 3 versions old
    assert metrics["train/is_masked_frac/staleness_0"] == 0.0
    assert metrics["train/is_masked_frac/staleness_1"] == 0.0
    assert metrics["train/is_masked_frac/staleness_2plus"] == 1.0
    assert metrics["train/is_weight_mean/staleness_0"] == pytest.approx(1.0, abs=1e-5)
    trained = [sum(s.loss_mask) for s in samples]
    assert metrics["train/is_mask_frac"] == pytest.approx((trained[2] + trained[3]) / sum(trained))


def _decoupled_ppo_loss(lp: torch.Tensor, prox: torch.Tensor, mu: torch.Tensor, adv: torch.Tensor,
                        eps: float = 0.2) -> torch.Tensor:
    """Decoupled PPO written out: -(1/|y|) sum_t sg(pi_prox/mu) min(r A, clip(r, 1-e, 1+e) A), r = pi_theta/pi_prox."""
    r = torch.exp(lp - prox)
    surrogate = torch.minimum(r * adv, r.clamp(1 - eps, 1 + eps) * adv)
    return -(torch.exp(prox - mu) * surrogate).mean()


def test_decoupled_ppo_gradient_is_the_unbounded_weight_wherever_the_ppo_clip_does_not_bind():
    """The claim next to mopd.core.algo.importance_weights: decoupled PPO's gradient is that of
    -sg(pi_theta/mu) A log pi_theta on every token whose PPO clip does not bind, in particular on all tokens at
    pi_theta = pi_prox (one optimizer step per batch); a token whose clip binds gets no gradient from it."""
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.3, 0.2, -0.5], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2, 1, 1])
    mu = torch.log(torch.tensor([0.5, 0.4, 0.6, 0.2]))  # behaviour probabilities of the sampled tokens
    a = torch.tensor([1.0, -0.5, 2.0, -1.0])

    def token_lp(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def grads(x: torch.Tensor, prox: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = x.clone().requires_grad_(True)
        _decoupled_ppo_loss(token_lp(x1), prox, mu, a).backward()
        x2 = x.clone().requires_grad_(True)
        lp = token_lp(x2).unsqueeze(0)
        # A_t = a_t through the MOPD teacher term with alpha = 0: teacher logprob = log pi_theta + a_t
        inputs = LossInputs(loss_mask=torch.ones(1, 4), rollout_logprobs=mu.unsqueeze(0),
                            teacher_logprobs=lp.detach() + a, orm_advantage=torch.zeros(1))
        adv = AdvantageConfig(alpha=0.0, teacher_coef=1.0)
        # w_t unbounded: eps_low = 0, eps_high = inf
        compute_loss("mopd", lp, inputs, adv, eps_low=0.0, eps_high=math.inf).loss_sum.backward()
        return x1.grad, x2.grad

    prox = token_lp(logits).detach()
    decoupled, ours = grads(logits, prox)  # at pi_prox: r = 1 on every token
    assert torch.allclose(decoupled, ours, atol=1e-6)
    # a step away from pi_prox (kept at the old weights): token 0 (A = 1) rises from p = e / (e + 1 + 1/e) = 0.665
    # to e^2 / (e^2 + 1 + 1/e) = 0.844, r = 1.27 > 1 + 0.2, so its clip binds; token 1 moves inside the band
    # (r = 1.08), token 3 (A = -1) rises to r = 1.21, where the pessimistic min keeps the unclipped branch
    moved = logits + torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.1], [0.0, 0.0, 0.0], [0.0, 0.3, 0.0]])
    r = torch.exp(token_lp(moved) - prox)
    assert r[0] > 1.2 and 0.8 < r[1] < 1.2 and r[3] > 1.2
    decoupled, ours = grads(moved, prox)
    assert torch.allclose(decoupled[1:], ours[1:], atol=1e-6)
    assert torch.equal(decoupled[0], torch.zeros(3)) and ours[0].abs().sum() > 0.1

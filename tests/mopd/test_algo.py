"""MOPD advantages and the importance mask against values computed by hand."""

import math

import pytest
import torch

from mopd.core.algo import (
    AdvantageConfig,
    grpo_advantages,
    importance_weights,
    per_sequence_token_mean,
    token_advantages,
    top_k_divergence,
)
from mopd.core.types import Sample
from mopd.rewards import assign_orm_advantages


def test_grpo_group_normalisation_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = grpo_advantages(rewards, groups)
    # group 0: mean 0.5, unbiased std sqrt(((.5^2)*4)/3) = sqrt(1/3)
    std = math.sqrt(1 / 3)
    expected0 = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std]
    assert adv[:4].tolist() == pytest.approx(expected0, rel=1e-5)
    # group 1: all rewards equal -> no signal
    assert adv[4:].tolist() == [0.0, 0.0]


def test_grpo_without_std_and_singleton_group():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0, 0, 1]), normalize_std=False)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.0])


def test_token_advantages_by_hand_with_masked_tokens():
    teacher = torch.tensor([-0.1, -2.0, -0.5, -1.0])
    student = torch.tensor([-0.6, -1.0, -0.5, -3.0], requires_grad=True)
    mask = torch.tensor([1, 1, 0, 1])
    adv = token_advantages(teacher, student, orm_advantage=0.8, loss_mask=mask, alpha=0.5)
    # A_t = (t - s) + 0.5 * 0.8 on masked-in tokens; 0 on the tool-output token
    assert adv.tolist() == pytest.approx([0.5 + 0.4, -1.0 + 0.4, 0.0, 2.0 + 0.4])
    assert not adv.requires_grad  # stop-gradient on the teacher term


def test_alpha_zero_is_pure_distillation_and_teacher_coef_zero_is_pure_grpo():
    teacher, student, mask = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.ones(2)
    assert token_advantages(teacher, student, 1.0, mask, alpha=0.0).tolist() == pytest.approx([0.5, -1.0])
    assert token_advantages(teacher, student, 1.0, mask, alpha=1.0, teacher_coef=0.0).tolist() == [1.0, 1.0]


def test_teacher_reward_clip_bounds_only_the_dense_term():
    teacher = torch.tensor([-15.0, -0.1, -0.2])
    student = torch.tensor([-0.5, -6.0, -0.4])
    mask = torch.tensor([1, 1, 1])
    adv = token_advantages(teacher, student, orm_advantage=1.0, loss_mask=mask, alpha=0.5, reward_clip=3.0)
    # dense rewards -14.5, 5.9, 0.2 -> clipped to -3, 3, 0.2; the outcome term 0.5 is added after clipping
    assert adv.tolist() == pytest.approx([-3.0 + 0.5, 3.0 + 0.5, 0.2 + 0.5])
    with pytest.raises(ValueError, match="algo.teacher_reward_clip"):
        AdvantageConfig(teacher_reward_clip=-1.0).validate()


def test_importance_mask_keeps_ratio_inside_band_and_zeroes_outside():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    mu = torch.log(torch.tensor([0.5, 0.2, 0.9, 0.4]))  # ratios 1.0, 2.5, 0.555.., 1.25
    mask = torch.tensor([1, 1, 1, 0])
    w = importance_weights(logp, mu, mask, eps_low=0.6, eps_high=2.0)
    assert w.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])  # 2.5 > high, 0.56 < low, last masked
    w = importance_weights(logp, mu, mask, eps_low=0.5, eps_high=3.0)
    assert w.tolist() == pytest.approx([1.0, 2.5, 0.5 / 0.9, 0.0])


def test_truncated_weights_cap_without_zeroing_and_the_staleness_bound_zeroes_in_both_modes():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    mu = torch.log(torch.tensor([0.5, 0.2, 0.9, 0.4]))  # ratios 1.0, 2.5, 0.555.., 1.25
    mask = torch.tensor([1, 1, 1, 0])
    w = importance_weights(logp, mu, mask, eps_low=0.6, eps_high=2.0, correction="truncate")
    assert w.tolist() == pytest.approx([1.0, 2.0, 0.5 / 0.9, 0.0])  # 2.5 capped at 2, 0.56 kept, last masked
    staleness = torch.tensor([3, 0, 2, 0])
    w = importance_weights(logp, mu, mask, eps_low=0.5, eps_high=3.0, staleness=staleness, max_staleness=2)
    assert w.tolist() == pytest.approx([0.0, 2.5, 0.5 / 0.9, 0.0])  # 3 versions old > 2
    w = importance_weights(logp, mu, mask, eps_low=0.5, eps_high=2.0, correction="truncate", staleness=staleness,
                           max_staleness=1)
    assert w.tolist() == pytest.approx([0.0, 2.0, 0.0, 0.0])
    w = importance_weights(logp, mu, mask, eps_low=0.5, eps_high=3.0, staleness=staleness, max_staleness=-1)
    assert w.tolist() == pytest.approx([1.0, 2.5, 0.5 / 0.9, 0.0])  # -1: no bound
    with pytest.raises(ValueError, match="correction='clip'"):
        importance_weights(logp, mu, mask, eps_low=0.5, eps_high=2.0, correction="clip")


def test_per_sequence_token_mean_counts_only_loss_tokens():
    values = torch.tensor([[1.0, 2.0, 100.0, 3.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]])
    assert per_sequence_token_mean(values, mask).tolist() == pytest.approx([2.0, 4.0])


def test_multi_turn_tool_tokens_get_no_advantage():
    # turn 1 (3 model tokens), tool output (2 tokens, mask 0), turn 2 (2 model tokens)
    mask = torch.tensor([1, 1, 1, 0, 0, 1, 1])
    teacher = torch.full((7,), -1.0)
    student = torch.full((7,), -2.0)
    adv = token_advantages(teacher, student, orm_advantage=1.0, loss_mask=mask, alpha=1.0)
    assert adv.tolist() == [2.0, 2.0, 2.0, 0.0, 0.0, 2.0, 2.0]


def test_assign_orm_advantages_uses_prompt_groups():
    samples = [Sample(prompt_index=g, group_index=g, domain="arith", prompt_ids=[1]) for g in (0, 0, 1, 1)]
    for s, r in zip(samples, (1.0, 0.0, 1.0, 1.0)):
        s.reward = r
    assign_orm_advantages(samples, AdvantageConfig())
    assert samples[0].orm_advantage > 0 > samples[1].orm_advantage
    assert samples[2].orm_advantage == samples[3].orm_advantage == 0.0


def test_top_k_divergence_by_hand_with_the_rest_bucket():
    student = torch.log(torch.tensor([0.5, 0.2]))  # rest 0.3
    teacher = torch.log(torch.tensor([0.9, 0.05]))  # rest 0.05
    s, t = [0.5, 0.2, 0.3], [0.9, 0.05, 0.05]
    reverse = sum(a * math.log(a / b) for a, b in zip(s, t))
    forward = sum(b * math.log(b / a) for a, b in zip(s, t))
    assert top_k_divergence(student, teacher).item() == pytest.approx(reverse, rel=1e-5)
    assert top_k_divergence(student, teacher, kind="forward_kl").item() == pytest.approx(forward, rel=1e-5)
    assert top_k_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="kind='js'"):
        top_k_divergence(student, teacher, kind="js")


def test_top_k_divergence_over_the_whole_vocabulary_is_the_exact_kl():
    torch.manual_seed(0)
    logits_s, logits_t = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7)
    s, t = torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1)
    exact = (s.exp() * (s - t)).sum(-1)
    got = top_k_divergence(s, t)  # k = vocabulary: the rest bucket is empty
    assert torch.allclose(got, exact, atol=1e-5)
    got.sum().backward()
    assert logits_s.grad is not None and logits_s.grad.abs().sum() > 0  # the student's side carries the gradient


def test_top_k_config_is_validated():
    with pytest.raises(ValueError, match="algo.teacher_top_k"):
        AdvantageConfig(teacher_top_k=-1).validate()
    with pytest.raises(ValueError, match="algo.top_k_divergence"):
        AdvantageConfig(top_k_divergence="js").validate()

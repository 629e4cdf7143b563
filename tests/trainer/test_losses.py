"""Losses against hand-computed values, and a gradient check through a real Megatron model."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.core.algo import AdvantageConfig
from mopd.core.errors import ConfigError
from trainer.losses import (
    LossInputs,
    LossOutput,
    compute_loss,
    known_losses,
    loss_spec,
    needed_fields,
    register_loss,
    token_logprobs_and_entropy,
)

# two sequences; the second has one trained token and two masked positions
LP = [[-1.0, -2.0, 0.0], [-0.5, -0.7, -0.3]]
MU = [[-1.0, -1.0, 0.0], [-0.6, 0.0, 0.0]]
TEACHER = [[-0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]]
MASK = [[1, 1, 0], [1, 0, 0]]
ORM = [1.0, -1.0]
ADV = AdvantageConfig(alpha=0.5, teacher_coef=1.0)


def _inputs() -> LossInputs:
    return LossInputs(loss_mask=torch.tensor(MASK, dtype=torch.float32), rollout_logprobs=torch.tensor(MU),
                      teacher_logprobs=torch.tensor(TEACHER), orm_advantage=torch.tensor(ORM))


def _run(kind: str):
    lp = torch.tensor(LP, requires_grad=True)
    out = compute_loss(kind, lp, _inputs(), ADV, eps_low=0.5, eps_high=2.0)
    out.loss_sum.backward()
    return out, lp.grad


def test_mopd_hand_computed():
    out, grad = _run("mopd")
    # seq 1: ratios [1, e^-1] -> w [1, 0] (0.37 < eps_low); A = [0.5 + 0.5, 1 + 0.5]; mean(w A lp) = -0.5
    # seq 2: ratio e^0.1 = w; A = 0.3 - 0.5 = -0.2; w A lp = 1.10517 * -0.2 * -0.5
    w2 = math.exp(0.1)
    assert out.loss_sum.item() == pytest.approx(0.5 - w2 * 0.1, abs=1e-6)
    assert out.is_masked_tokens == 1.0 and out.mask_tokens == 3.0
    assert out.kl_rollout_sum == pytest.approx((-1 + 1) + (-1 + 2) + (-0.6 + 0.5), abs=1e-6)
    # d/dlp with w, A detached: -w A / |y|
    expected = torch.tensor([[-0.5, 0.0, 0.0], [w2 * 0.2, 0.0, 0.0]])
    assert torch.allclose(grad, expected, atol=1e-6)


def test_per_teacher_coef_scales_only_that_teachers_term_hand_computed():
    """teachers.NAME.coef: seq 1 scored by a teacher with coef 2, seq 2 by one with coef 0.5."""
    inputs = _inputs()
    inputs.teacher_coef = torch.tensor([2.0, 0.5])
    lp = torch.tensor(LP, requires_grad=True)
    out = compute_loss("mopd", lp, inputs, ADV, eps_low=0.5, eps_high=2.0)
    out.loss_sum.backward()
    w2 = math.exp(0.1)
    # seq 1: w [1, 0]; A_1 = 2 * (-0.5 + 1.0) + 0.5 * 1 = 1.5 -> mean over 2 tokens of w A lp = -1.5 / 2
    # seq 2: w2; A = 0.5 * (-0.2 + 0.5) + 0.5 * -1 = -0.35 -> w2 * -0.35 * -0.5
    assert out.loss_sum.item() == pytest.approx(0.75 - 0.175 * w2, abs=1e-6)
    assert torch.allclose(lp.grad, torch.tensor([[-0.75, 0.0, 0.0], [0.35 * w2, 0.0, 0.0]]), atol=1e-6)
    # coef 1 everywhere is the plain MOPD loss; grpo ignores the coefficient (no teacher term)
    inputs.teacher_coef = torch.ones(2)
    plain = compute_loss("mopd", torch.tensor(LP), inputs, ADV, eps_low=0.5, eps_high=2.0).loss_sum.item()
    assert plain == pytest.approx(0.5 - 0.1 * w2, abs=1e-6)
    inputs.teacher_coef = torch.tensor([2.0, 0.5])
    assert compute_loss("grpo", torch.tensor(LP), inputs, ADV, eps_low=0.5, eps_high=2.0).loss_sum.item() == \
        pytest.approx(0.25 - w2 * 0.25, abs=1e-6)


def test_per_teacher_coef_scales_the_top_k_divergence_and_reaches_the_batch():
    from tests.trainer.conftest import make_samples
    from trainer.batching import collate

    adv = AdvantageConfig(alpha=0.0, teacher_coef=1.0, teacher_top_k=2)
    inputs = _inputs()
    inputs.teacher_top_logprobs = torch.log(torch.tensor([[[0.7, 0.2]] * 3, [[0.6, 0.3]] * 3]))
    student_top = torch.log(torch.tensor([[[0.4, 0.4]] * 3, [[0.5, 0.1]] * 3]))
    losses = []
    for coef in ([1.0, 1.0], [3.0, 0.0]):
        inputs.teacher_coef = torch.tensor(coef)
        losses.append(compute_loss("mopd", torch.tensor(LP), inputs, adv, eps_low=0.5, eps_high=2.0,
                                   student_top_logprobs=student_top))
    one = [compute_loss("mopd", torch.tensor(LP)[i:i + 1], _slice(inputs, i, [1.0]), adv, eps_low=0.5,
                        eps_high=2.0, student_top_logprobs=student_top[i:i + 1]).loss_sum.item() for i in (0, 1)]
    assert losses[0].loss_sum.item() == pytest.approx(one[0] + one[1], abs=1e-6)
    assert losses[1].loss_sum.item() == pytest.approx(3 * one[0], abs=1e-6)  # alpha = 0: linear in the coef
    samples = make_samples(3)
    samples[1].metadata["teacher_coef"] = 0.25  # set by TeacherSet.score from teachers.NAME.coef
    assert collate(samples, [0, 1, 2]).inputs.teacher_coef.tolist() == [1.0, 0.25, 1.0]


def _slice(inputs: LossInputs, i: int, coef: list[float]) -> LossInputs:
    return LossInputs(loss_mask=inputs.loss_mask[i:i + 1], rollout_logprobs=inputs.rollout_logprobs[i:i + 1],
                      teacher_logprobs=inputs.teacher_logprobs[i:i + 1], orm_advantage=inputs.orm_advantage[i:i + 1],
                      teacher_top_logprobs=inputs.teacher_top_logprobs[i:i + 1], teacher_coef=torch.tensor(coef))


def test_grpo_ignores_teacher():
    out, grad = _run("grpo")
    w2 = math.exp(0.1)
    # A = alpha * orm only: seq 1 [0.5, 0.5] (token 2 masked by IS), seq 2 -0.5
    assert out.loss_sum.item() == pytest.approx(0.25 - w2 * 0.25, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[-0.25, 0.0, 0.0], [w2 * 0.5, 0.0, 0.0]]), atol=1e-6)
    no_teacher = _inputs()
    no_teacher.teacher_logprobs = None
    lp = torch.tensor(LP)
    assert compute_loss("grpo", lp, no_teacher, ADV, eps_low=0.5, eps_high=2.0).loss_sum.item() == \
        pytest.approx(out.loss_sum.item())
    with pytest.raises(ValueError, match="teacher_logprobs"):
        compute_loss("mopd", lp, no_teacher, ADV, eps_low=0.5, eps_high=2.0)


def test_mopd_with_teacher_top_k_replaces_the_sampled_reward_by_the_divergence():
    from mopd.core.algo import top_k_divergence

    adv = AdvantageConfig(alpha=0.5, teacher_coef=2.0, teacher_top_k=2, top_k_divergence="forward_kl")
    inputs = _inputs()
    inputs.teacher_top_logprobs = torch.log(torch.tensor([[[0.7, 0.2]] * 3, [[0.6, 0.3]] * 3]))
    student_top = torch.log(torch.tensor([[[0.4, 0.4]] * 3, [[0.5, 0.1]] * 3])).requires_grad_(True)
    lp = torch.tensor(LP, requires_grad=True)
    out = compute_loss("mopd", lp, inputs, adv, eps_low=0.5, eps_high=2.0, student_top_logprobs=student_top)
    out.loss_sum.backward()
    d = top_k_divergence(student_top.detach(), inputs.teacher_top_logprobs, kind="forward_kl")
    w2 = math.exp(0.1)
    # seq 1: w [1, 0]; A = alpha*orm = 0.5 -> mean(w (A lp - 2 d)) over 2 tokens; seq 2: w2 (-0.5 * -0.5 - 2 d)
    seq1 = (0.5 * -1.0 - 2 * d[0, 0].item()) / 2
    seq2 = w2 * (-0.5 * -0.5 - 2 * d[1, 0].item())
    assert out.loss_sum.item() == pytest.approx(-(seq1 + seq2), abs=1e-5)
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, 0.0, 0.0], [w2 * 0.5, 0.0, 0.0]]), atol=1e-6)
    assert student_top.grad[0, 0].abs().sum() > 0 and student_top.grad[0, 1:].abs().sum() == 0  # masked/IS
    with pytest.raises(ValueError, match="student's logprobs"):
        compute_loss("mopd", lp, inputs, adv, eps_low=0.5, eps_high=2.0)


def test_sft_cross_entropy():
    out, grad = _run("sft")
    assert out.loss_sum.item() == pytest.approx((1 + 2) / 2 + 0.5, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[-0.5, -0.5, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ConfigError, match=r"trainer.loss`: expected one of \('mopd', 'grpo', 'sft'"):
        compute_loss("ppo", torch.tensor(LP), _inputs(), ADV, eps_low=0.5, eps_high=2.0)


def test_each_registered_loss_declares_the_inputs_it_needs():
    assert known_losses()[:3] == ("mopd", "grpo", "sft")
    assert needed_fields("mopd", ADV) == ("rollout_logprobs", "teacher_logprobs")
    assert needed_fields("mopd", AdvantageConfig(teacher_coef=0.0)) == ("rollout_logprobs",)
    assert needed_fields("mopd", AdvantageConfig(teacher_top_k=4)) == \
        ("rollout_logprobs", "teacher_top_ids", "teacher_top_logprobs")
    assert needed_fields("grpo", ADV) == ("rollout_logprobs",) and needed_fields("sft", ADV) == ()
    assert loss_spec("mopd").needs_teacher and not loss_spec("grpo").needs_teacher


def test_a_loss_registered_by_name_is_picked_by_trainer_loss():
    @register_loss("test_neg_mean", needs_rollout_logprobs=True)
    def neg_mean(logprobs, inputs, ctx):
        mask = inputs.loss_mask.to(logprobs.dtype)
        return LossOutput(loss_sum=-(logprobs * mask).sum(), is_masked_tokens=0.0, kl_rollout_sum=0.0,
                          mask_tokens=float(mask.sum()))

    out = compute_loss("test_neg_mean", torch.tensor(LP), _inputs(), ADV, eps_low=0.5, eps_high=2.0)
    assert out.loss_sum.item() == pytest.approx(1.0 + 2.0 + 0.5)
    assert needed_fields("test_neg_mean", ADV) == ("rollout_logprobs",)
    from trainer.config import TrainerConfig

    TrainerConfig(loss="test_neg_mean").validate()  # the config accepts every registered name


def test_token_logprobs_and_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 2]])
    lp, ent, _ = token_logprobs_and_entropy(logits, targets, temperature=2.0)
    z = math.exp(1.0) + 1 + math.exp(-0.5)
    assert lp[0, 0].item() == pytest.approx(1.0 - math.log(z), abs=1e-6)
    assert lp[0, 1].item() == pytest.approx(-math.log(3), abs=1e-6)
    assert ent[0, 1].item() == pytest.approx(math.log(3), abs=1e-6)


def test_gradient_through_megatron_model(moe_path, dist_env):
    """Engine loss gradient == gradient of the formula written out by hand with constant w*A."""
    from tests.trainer.conftest import make_samples
    from trainer.config import TrainerConfig
    from trainer.rank import TrainerRank

    engine = TrainerRank(moe_path, TrainerConfig(lr=1e-3, grad_clip=0.0), AdvantageConfig(alpha=0.3),
                         num_steps=1)
    samples = make_samples(4, seed=3)
    lps = engine.compute_logprobs(samples)
    samples[0].rollout_logprobs = [float(x) for x in lps[0]]  # ratio 1: kept by the IS mask
    params = dict(engine.model.named_parameters())
    name = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    before = params[name].detach().clone()
    # reference: rebuild the same loss from the model's logprobs with numpy-side constants
    engine.model.train()
    engine.model.zero_grad()
    ref = 0.0
    for s in samples:
        logits = engine.model(torch.tensor([s.tokens]), torch.arange(len(s.tokens)).unsqueeze(0), None)
        logp = torch.log_softmax(logits[0, :-1].float(), -1)
        lp = logp[len(s.prompt_ids) - 1:].gather(-1, torch.tensor(s.response_ids).unsqueeze(-1)).squeeze(-1)
        c = []
        for t in range(len(s.response_ids)):
            ratio = math.exp(lp[t].item() - s.rollout_logprobs[t])
            w = ratio if (0.5 <= ratio <= 2.0 and s.loss_mask[t]) else 0.0
            a = (s.teacher_logprobs[t] - lp[t].item() + 0.3 * s.orm_advantage) * s.loss_mask[t]
            c.append(w * a)
        ref = ref - (torch.tensor(c) * lp).sum() / sum(s.loss_mask)
    (ref / len(samples)).backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in params.items()}
    engine.model.zero_grad()
    metrics = engine.train_step(samples, len(samples))
    assert metrics["train/loss"] == pytest.approx(ref.item() / len(samples), rel=1e-5, abs=1e-6)
    assert metrics["train/grad_norm"] > 0
    # train_step also stepped the optimizer; the gradients it used are still in .grad
    for n, p in params.items():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6, rtol=1e-4), n
    assert not torch.equal(params[name].detach(), before)


def test_temperature_0_7_teacher_term_untempered_is_and_gradient_tempered_hand_computed():
    """At rollout temperature T = 0.7: w_t = pi^T/mu and the gradient use log pi^T; the teacher reward uses
    log pi^1 (SGLang's teacher prefill logprobs are untempered), for the sampled-token and top-k rewards."""
    from trainer.losses import student_logprobs

    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.2, -0.3]]], requires_grad=True)
    targets = torch.tensor([[0, 2]])
    t = 0.7
    view = student_logprobs(logits, targets, t, top_ids=torch.tensor([[[0, 1], [1, 0]]]))
    lse_t = [math.log(sum(math.exp(v / t) for v in row)) for row in ([1.0, 0.0, -1.0], [0.5, 0.2, -0.3])]
    lse_1 = [math.log(sum(math.exp(v) for v in row)) for row in ([1.0, 0.0, -1.0], [0.5, 0.2, -0.3])]
    lp_t = [1.0 / t - lse_t[0], -0.3 / t - lse_t[1]]
    lp_1 = [1.0 - lse_1[0], -0.3 - lse_1[1]]
    assert view.tempered[0].tolist() == pytest.approx(lp_t, abs=1e-6)
    assert view.untempered[0].tolist() == pytest.approx(lp_1, abs=1e-6)
    assert view.top[0].flatten().tolist() == pytest.approx([1.0 - lse_1[0], 0.0 - lse_1[0],
                                                            0.2 - lse_1[1], 0.5 - lse_1[1]], abs=1e-6)
    mu, teacher, orm = [lp_t[0] - 0.1, lp_t[1] + 0.2], [-0.4, -1.5], 0.0
    inputs = LossInputs(loss_mask=torch.ones(1, 2), rollout_logprobs=torch.tensor([mu]),
                        teacher_logprobs=torch.tensor([teacher]), orm_advantage=torch.tensor([orm]))
    adv = AdvantageConfig(alpha=0.5, teacher_coef=1.0)
    out = compute_loss("mopd", view.tempered, inputs, adv, eps_low=0.5, eps_high=2.0,
                       untempered_logprobs=view.untempered)
    w = [math.exp(0.1), math.exp(-0.2)]
    a = [teacher[0] - lp_1[0], teacher[1] - lp_1[1]]  # reward against the untempered student
    assert out.loss_sum.item() == pytest.approx(-(w[0] * a[0] * lp_t[0] + w[1] * a[1] * lp_t[1]) / 2, abs=1e-6)
    # without the untempered view the reward would compare a tempered student with an untempered teacher
    wrong = compute_loss("mopd", view.tempered, inputs, adv, eps_low=0.5, eps_high=2.0)
    assert abs(wrong.loss_sum.item() - out.loss_sum.item()) > 1e-3
    # T = 1: one view, the same tensor
    one = student_logprobs(logits, targets, 1.0)
    assert one.untempered is one.tempered


def test_engine_trains_the_teacher_term_untempered_at_rollout_temperature(moe_path, dist_env):
    """Through the Megatron engine at T = 0.7: the loss equals the hand formula on the engine's own logits."""
    from tests.trainer.conftest import make_samples
    from trainer.config import TrainerConfig
    from trainer.rank import TrainerRank

    samples = make_samples(3, seed=11)
    engine = TrainerRank(moe_path, TrainerConfig(lr=1e-3, loss="mopd", eps_low=0.0, eps_high=1e9),
                         AdvantageConfig(alpha=0.0, teacher_coef=1.0), num_steps=1, rollout_temperature=0.7)
    mb = engine._microbatches(samples)[0]
    with torch.no_grad():
        logits = engine.model(mb.tokens, mb.position_ids, None)[:, :-1].float()
    lp_t = torch.log_softmax(logits / 0.7, -1).gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)
    lp_1 = torch.log_softmax(logits, -1).gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)
    mask, mu, teacher = mb.inputs.loss_mask, mb.inputs.rollout_logprobs, mb.inputs.teacher_logprobs
    w = torch.exp(lp_t - mu) * mask
    per_seq = (w * (teacher - lp_1) * lp_t * mask).sum(-1) / mask.sum(-1)
    metrics = engine.train_step(samples, len(samples))
    assert metrics["train/loss"] == pytest.approx(-per_seq.sum().item() / len(samples), rel=1e-4, abs=1e-5)

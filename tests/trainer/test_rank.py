"""One rank in-process: packing, microbatch invariance, LR schedule, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mopd.core.algo import AdvantageConfig
from mopd.core.errors import ConfigError
from tests.trainer.conftest import make_samples
from trainer.batching import collate, plan_microbatches
from trainer.config import TrainerConfig
from trainer.optim import lr_lambda
from trainer.rank import TrainerRank


def test_plan_respects_budget_and_covers_all():
    lengths = [5, 17, 3, 9, 9, 30, 2]
    plan = plan_microbatches(lengths, 20)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    for mb in plan:
        assert max(lengths[i] for i in mb) * len(mb) <= 20 or len(mb) == 1
    assert [5] in plan  # longer than the budget: alone


def test_collate_alignment():
    s = make_samples(2, seed=1)
    mb = collate(s, [1, 0])
    b0 = mb.indices.index(0)
    p, r = len(s[0].prompt_ids), len(s[0].response_ids)
    assert mb.targets[b0, p - 1:p - 1 + r].tolist() == s[0].response_ids
    assert mb.inputs.loss_mask[b0, p - 1:p - 1 + r].tolist() == s[0].loss_mask
    assert mb.inputs.loss_mask[b0].sum() == sum(s[0].loss_mask)
    assert torch.allclose(mb.inputs.rollout_logprobs[b0, p - 1:p - 1 + r], torch.tensor(s[0].rollout_logprobs))


def test_microbatching_does_not_change_the_step(moe_path, dist_env):
    samples = make_samples(6, seed=7)
    results = []
    for budget in (4096, 24):
        engine = TrainerRank(moe_path, TrainerConfig(max_tokens_per_microbatch=budget, lr=1e-3),
                             AdvantageConfig(alpha=0.5), num_steps=2)
        lps = engine.compute_logprobs(samples)
        metrics = engine.train_step(samples, len(samples))
        # compare gradients (Adam's sign-like update amplifies float noise of near-zero grads)
        results.append((lps, metrics, {n: p.grad.clone() for n, p in engine.model.named_parameters()}))
    (lp_a, m_a, p_a), (lp_b, m_b, p_b) = results
    for a, b in zip(lp_a, lp_b):
        assert abs(a - b).max() < 1e-5
    for key in ("train/loss", "train/grad_norm", "train/entropy", "train/is_mask_frac", "train/kl_rollout"):
        assert m_a[key] == pytest.approx(m_b[key], rel=1e-5, abs=1e-6), key
    assert 0 < m_a["train/is_mask_frac"] < 1
    for n in p_a:
        assert torch.allclose(p_a[n], p_b[n], atol=1e-6, rtol=1e-4), n


def test_lr_schedules():
    cfg = TrainerConfig(lr=1.0, min_lr=0.1, warmup_steps=2, lr_schedule="cosine")
    f = lr_lambda(cfg, 12)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(12) == pytest.approx(0.1) and f(7) == pytest.approx(0.55)
    g = lr_lambda(TrainerConfig(lr=1.0, lr_schedule="linear"), 10)
    assert g(5) == pytest.approx(0.5)


def test_clear_errors(moe_path, dist_env):
    engine = TrainerRank(moe_path, TrainerConfig(), AdvantageConfig(), num_steps=1)
    s = make_samples(2, seed=4)
    s[1].teacher_logprobs = None
    with pytest.raises(ValueError, match=r"sample 1: Sample.teacher_logprobs must have one entry per response"):
        engine.train_step(s, 2)
    s = make_samples(1, seed=4)
    s[0].response_ids = s[0].response_ids + [10**6]
    s[0].loss_mask = s[0].loss_mask + [1]
    s[0].rollout_logprobs = s[0].rollout_logprobs + [0.0]
    s[0].teacher_logprobs = s[0].teacher_logprobs + [0.0]
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 128\)"):
        engine.compute_logprobs(s)
    with pytest.raises(ConfigError, match="tp_size.*num_attention_heads=4"):  # the tiny model's 4 heads
        TrainerRank(moe_path, TrainerConfig(tp_size=3), AdvantageConfig(), num_steps=1)
    with pytest.raises(ValueError, match=r"parallel state has \(tp, pp, ep\) = \(1, 1, 1\)"):
        TrainerRank(moe_path, TrainerConfig(tp_size=2), AdvantageConfig(), num_steps=1)
    with pytest.raises(ConfigError, match="activation_recompute"):
        TrainerRank(moe_path, TrainerConfig(activation_recompute=True), AdvantageConfig(), num_steps=1)
    with pytest.raises(ConfigError, match="trainer.loss"):
        TrainerConfig(loss="dpo").validate()


def test_mopd_without_teacher_when_teacher_coef_is_zero(moe_path, dist_env):
    engine = TrainerRank(moe_path, TrainerConfig(loss="mopd"), AdvantageConfig(teacher_coef=0.0), num_steps=1)
    samples = make_samples(2, seed=9)
    for s in samples:
        s.teacher_logprobs = None
    metrics = engine.train_step(samples, 2)
    assert metrics["train/grad_norm"] > 0


def test_bfloat16_model_steps_fp32_master_weights(moe_path, dist_env):
    samples = make_samples(3, seed=12)
    engine = TrainerRank(moe_path, TrainerConfig(dtype="bfloat16", lr=1e-6), AdvantageConfig(), num_steps=2)
    assert engine.optim.mixed and any(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    before = [m.clone() for m in engine.optim.masters]
    lps = engine.compute_logprobs(samples)
    assert all(np.isfinite(lp).all() for lp in lps)
    engine.train_step(samples, len(samples))
    moved = sum(int((m != b).sum()) for m, b in zip(engine.optim.masters, before))
    # an lr of 1e-6 is below bf16 resolution for most weights: only the fp32 masters keep the update
    assert moved > 0 and all(m.dtype == torch.float32 for m in engine.optim.masters)
    for p, m in zip(engine.optim.params, engine.optim.masters):
        assert torch.equal(p, m.to(p.dtype))
    state = engine.state_dict()
    fresh = TrainerRank(moe_path, TrainerConfig(dtype="bfloat16", lr=1e-6), AdvantageConfig(), num_steps=2)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.optim.masters, engine.optim.masters))

"""The MOPD loss actually distils: on-policy steps pull the student's logprobs onto the teacher's."""

from __future__ import annotations

import numpy as np

from mopd.core.algo import AdvantageConfig
from tests.trainer.conftest import make_samples
from trainer.config import TrainerConfig
from trainer.rank import TrainerRank


def test_mopd_closes_the_teacher_gap(tokenizer, tmp_path, moe_path, dist_env):
    from mopd.toy.models import create_tiny_model

    teacher_path = create_tiny_model(tmp_path / "teacher", tokenizer, arch="qwen3_moe", seed=1)
    teacher = TrainerRank(str(teacher_path), TrainerConfig(), AdvantageConfig(), num_steps=1)
    student = TrainerRank(moe_path, TrainerConfig(lr=1e-2), AdvantageConfig(alpha=0.0), num_steps=20)
    samples = make_samples(8, seed=1)
    teacher_lp = teacher.compute_logprobs(samples)
    for s, t in zip(samples, teacher_lp):
        s.teacher_logprobs = [float(x) for x in t]

    def gap_and_logprobs():
        lps = student.compute_logprobs(samples)
        gap = np.mean([np.abs(a - b)[np.array(s.loss_mask) == 1].mean()
                       for a, b, s in zip(lps, teacher_lp, samples)])
        return gap, lps

    start, _ = gap_and_logprobs()
    for _ in range(20):
        _, lps = gap_and_logprobs()
        for s, lp in zip(samples, lps):  # on-policy: mu = current policy
            s.rollout_logprobs = [float(x) for x in lp]
        metrics = student.train_step(samples, len(samples))
        assert metrics["train/is_mask_frac"] == 0.0
    end, _ = gap_and_logprobs()
    print(f"mean |log pi_teacher - log pi_student|: {start:.4f} -> {end:.4f}")
    assert end < 0.5 * start


def test_mopd_with_teacher_top_k_closes_the_divergence(tokenizer, tmp_path, moe_path, dist_env):
    """algo.teacher_top_k: the per-position divergence to the teacher's top-k distribution falls."""
    import torch
    from transformers import AutoModelForCausalLM

    from mopd.toy.models import create_tiny_model

    teacher_path = create_tiny_model(tmp_path / "teacher", tokenizer, arch="qwen3_moe", seed=1)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    samples = make_samples(8, seed=2)
    for s in samples:
        with torch.no_grad():
            logp = torch.log_softmax(teacher(torch.tensor([s.tokens])).logits[0].float(), -1)
        top_lp, top_ids = torch.topk(logp[len(s.prompt_ids) - 1:len(s.tokens) - 1], 8)
        s.teacher_top_ids, s.teacher_top_logprobs = top_ids.tolist(), top_lp.tolist()
    adv = AdvantageConfig(alpha=0.0, teacher_top_k=8)
    student = TrainerRank(moe_path, TrainerConfig(lr=1e-2), adv, num_steps=20)
    losses = []
    for _ in range(20):
        for s, lp in zip(samples, student.compute_logprobs(samples)):  # on-policy: mu = current policy
            s.rollout_logprobs = [float(x) for x in lp]
        losses.append(student.train_step(samples, len(samples))["train/loss"])  # = mean divergence (alpha 0)
    print(f"top-k reverse KL: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0]

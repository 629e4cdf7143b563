"""The MOPD loss actually distils: on-policy steps pull the student's logprobs onto the teacher's."""

from __future__ import annotations

import numpy as np

from mopd.advantages import AdvantageConfig
from tests.trainer.conftest import make_samples
from trainer.config import TrainerConfig
from trainer.engine import TrainEngine


def test_mopd_closes_the_teacher_gap(tokenizer, tmp_path, moe_path, dist_env):
    from mopd.toy.models import create_tiny_model

    teacher_path = create_tiny_model(tmp_path / "teacher", tokenizer, arch="qwen3_moe", seed=1)
    teacher = TrainEngine(str(teacher_path), TrainerConfig(), AdvantageConfig(), num_steps=1)
    student = TrainEngine(moe_path, TrainerConfig(lr=1e-2), AdvantageConfig(alpha=0.0), num_steps=20)
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

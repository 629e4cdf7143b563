"""The scheduler benchmark's world: a student that writes `echo` answers of the right length, and an echo teacher.

`mopd.toy.world` on the `echo` domain alone (envs/toy_tasks.py: lognormal word lengths, the longest 8x
the median). The base student is warmed up by a short SFT so its responses already track the prompt's
length (measured on a probe: sampled lengths within a few characters of the answer's, 0.11 greedy accuracy);
the teacher continues from it on more steps (0.33 greedy): learning is real, lengths are heavy-tailed from
the first step.
"""

from __future__ import annotations

from benchmarks.mopd_vs_baselines.world import World, build_world
from mopd.toy.world import ToyWorldSpec

FULL_WORLD = ToyWorldSpec(domains=("echo",), base_steps=150, teacher_steps=300, train_prompts_per_domain=4000,
                          test_prompts_per_domain=64)
QUICK_WORLD = ToyWorldSpec(domains=("echo",), hidden_size=32, base_steps=30, teacher_steps=30,
                           train_prompts_per_domain=400, test_prompts_per_domain=16)

__all__ = ["FULL_WORLD", "QUICK_WORLD", "World", "build_world"]

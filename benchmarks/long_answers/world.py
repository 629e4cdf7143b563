"""The long-answer benchmark's world: a base student that writes the format but slips, and one expert per domain.

It is benchmarks/mopd_vs_baselines' world (`mopd.toy.world` with a warmed-up base) on the long-answer
domains `shift` and `rot` (envs/toy_tasks.py), plus a validation split (data/val.jsonl, its own seed)
on which every method's learning rate is chosen and the training curves are measured; the test split
(data/test.jsonl) is only read for the final table.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from benchmarks.mopd_vs_baselines.world import World, build_world
from envs.toy_tasks import ANY_ORDER_DOMAINS, CORRECTABLE_DOMAINS, LONG_ANSWER_DOMAINS, make_examples
from mopd.toy.world import ToyWorldSpec

# Measured (probe, hidden 64, 2 layers, lr 3e-3, batch 32): mixed SFT on both domains reaches 0.95 greedy on
# shift after ~300 steps and on rot after ~700; the base stops before either, each teacher trains on
# its own domain only until it masters it.
FULL_WORLD = ToyWorldSpec(domains=LONG_ANSWER_DOMAINS, base_steps=220, teacher_steps=300)
QUICK_WORLD = ToyWorldSpec(domains=LONG_ANSWER_DOMAINS, hidden_size=32, base_steps=20, teacher_steps=30,
                           train_prompts_per_domain=200, test_prompts_per_domain=20)
# The same rounds with `!` corrections (`shiftfix`, `rotfix`): every SFT round of the world slips with
# probability 0.2, loss-masked, and is corrected. Measured (probe, hidden 64, from a random init): 1200 steps
# of that give a shiftfix expert with greedy 1.0 that puts P(!) 0.44 on average right after a slip and 0.01
# after a correct round (at 0.5 of rows with one slip, 800 steps learnt no detection at all); the teachers
# here start from the 220-step base and train 1000 more.
FIX_WORLD = replace(FULL_WORLD, domains=CORRECTABLE_DOMAINS, teacher_steps=1000, recovery_prob=0.2)
QUICK_FIX_WORLD = replace(QUICK_WORLD, domains=CORRECTABLE_DOMAINS, recovery_prob=0.2)
# Many right answers (`anagram`, `shuffle`: every round any ordering of the prompt's items). Measured (probe,
# mixed SFT from a random init, batch 32, lr 3e-3; greedy/sampled accuracy): step 700 anagram 0.48/0.06, shuffle
# 0.92/0.37; step 1100 0.95/0.48, 1.0/0.63; shuffle alone plateaus near 0.85 sampled by step 1200 (to 2000).
ANY_WORLD = replace(FULL_WORLD, domains=ANY_ORDER_DOMAINS, base_steps=700, teacher_steps=800)
QUICK_ANY_WORLD = replace(QUICK_WORLD, domains=ANY_ORDER_DOMAINS)
VAL_SEED_OFFSET = 20_000  # train uses spec.seed, test spec.seed + 10_000 (mopd.toy.world.write_datasets)


def val_file(world: World) -> Path:
    return world.root / "data" / "val.jsonl"


def build_long_world(root: str | Path, spec: ToyWorldSpec, val_per_domain: int = 200) -> World:
    """The toy world (reused when its manifest matches) plus data/val.jsonl, disjoint in seed from train/test."""
    world = build_world(root, spec)
    path = val_file(world)
    if not path.is_file():
        rows = [r for d in spec.domains for r in make_examples(d, val_per_domain, spec.seed + VAL_SEED_OFFSET)]
        random.Random(spec.seed + VAL_SEED_OFFSET).shuffle(rows)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return world

"""The benchmark's world: a weak generalist base student and one SFT expert per domain from that base.

It is `mopd.toy.world` with a warmed-up base (`base_steps` of mixed-domain SFT): from a random base no
method learns anything within this benchmark's CPU budget (measured: on-policy distillation still had 0
accuracy on every domain after 37k sampled tokens). The MOPD setting is a student that is already a
generalist and teachers that are specialists derived from it; each teacher continues from the base on
its own domain only (`teacher_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mopd.toy.world import ToyWorldSpec, ensure_toy_world

FULL_WORLD = ToyWorldSpec(domains=("arith", "reverse", "sort"), base_steps=220, teacher_steps=400)
QUICK_WORLD = ToyWorldSpec(domains=("arith", "reverse"), hidden_size=32, base_steps=20, teacher_steps=40)


@dataclass
class World:
    root: Path

    @property
    def student(self) -> Path:
        return self.root / "student"

    def teacher(self, domain: str) -> Path:
        return self.root / f"teacher_{domain}"

    @property
    def train_file(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def test_file(self) -> Path:
        return self.root / "data" / "test.jsonl"


def build_world(root: str | Path, spec: ToyWorldSpec) -> World:
    """Create (or reuse, when its manifest matches `spec`) the base student, teachers and datasets."""
    return World(ensure_toy_world(root, spec))

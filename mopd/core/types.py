"""Data that crosses package boundaries: plain dataclasses, numpy arrays, no framework objects.

A `Sample` is one trajectory: it is created by the data scheduler (prompt side), filled in by
rollout (response side), by the teachers and verifiers (scores) and by the advantage computation,
and finally consumed by the trainer. Keeping it one type avoids conversion layers between stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TokenScores:
    """A model's view of given tokens: log p of each, and optionally its top-k tokens at each position."""

    logprobs: list[float]
    top_ids: list[list[int]] | None = None  # per position, the k most likely token ids, most likely first
    top_logprobs: list[list[float]] | None = None  # their log p


@dataclass
class Sample:
    """One trajectory (prompt + response), single-turn or multi-turn.

    Per-response-token lists (`loss_mask`, `rollout_logprobs`, `weight_versions`, `teacher_logprobs`)
    all have `len(response_ids)` entries. In multi-turn trajectories the tool/env
    observation tokens are part of `response_ids` with `loss_mask == 0`.
    """

    prompt_index: int  # position in the data stream; used for exact resume
    group_index: int  # samples drawn from the same prompt share it (GRPO groups)
    domain: str
    prompt_ids: list[int]
    label: Any = None  # ground truth handed to the verifier
    metadata: dict[str, Any] = field(default_factory=dict)

    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)  # mu(y_t), 0.0 where loss_mask == 0
    weight_versions: list[int] = field(default_factory=list)
    # SGLang layout: int32 [len(prompt_ids) + len(response_ids) - 1, num_hidden_layers, top_k]
    routed_experts: np.ndarray | None = None
    finish_reason: str = ""  # "stop" | "length" | "abort"
    response_text: str = ""

    reward: float = 0.0
    teacher: str | None = None
    teacher_logprobs: list[float] | None = None
    # algo.teacher_top_k > 0: the teacher's k most likely tokens at each response position, and their log p
    teacher_top_ids: list[list[int]] | None = None
    teacher_top_logprobs: list[list[float]] | None = None
    orm_advantage: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    def check(self) -> None:
        """Raise if the per-token fields disagree in length (catches bugs at stage boundaries)."""
        n = len(self.response_ids)
        for name in ("loss_mask", "rollout_logprobs", "weight_versions"):
            value = getattr(self, name)
            if value and len(value) != n:
                raise ValueError(f"Sample.{name} has {len(value)} entries, expected {n} (response length)")
        for name in ("teacher_logprobs", "teacher_top_ids", "teacher_top_logprobs"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Sample.{name} has {len(value)} entries, expected {n} (response length)")
        if self.routed_experts is not None:
            expected = len(self.prompt_ids) + n - 1
            if self.routed_experts.shape[0] != expected:
                raise ValueError(
                    f"Sample.routed_experts has {self.routed_experts.shape[0]} rows, expected {expected}"
                    " (prompt + response - 1)"
                )

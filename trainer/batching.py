"""Samples -> right-padded microbatches under a token budget, with per-token loss tensors.

Right padding with causal attention needs no attention mask: a real token only attends to
earlier (real) positions, and padding never reaches the loss (mask 0). The MoE dispatcher used
here has no capacity limit, so padding tokens do not change how real tokens are routed either.
Column p of every [B, S-1] tensor belongs to the token at position p+1 (predicted from p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mopd.core.types import Sample
from trainer.losses import LossInputs


@dataclass
class MicroBatch:
    indices: list[int]  # positions of these samples in the caller's list
    tokens: torch.Tensor  # [B, S] int64, right-padded with 0
    position_ids: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S-1] = tokens[:, 1:]
    inputs: LossInputs
    prompt_lengths: list[int]


def validate_samples(samples: list[Sample], *, vocab_size: int, need: tuple[str, ...] = ()) -> None:
    """Fail early, naming the sample and the field, instead of deep inside the model."""
    for i, s in enumerate(samples):
        s.check()
        if not s.prompt_ids:
            raise ValueError(f"sample {i}: prompt_ids is empty; expected at least one token")
        if not s.response_ids:
            raise ValueError(f"sample {i}: response_ids is empty; expected at least one token")
        bad = [t for t in s.tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sample {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        for name in need:
            value = getattr(s, name)
            if value is None or (isinstance(value, list) and len(value) != len(s.response_ids)):
                raise ValueError(f"sample {i}: Sample.{name} must have one entry per response token "
                                 f"({len(s.response_ids)}), got {None if value is None else len(value)}")


def plan_microbatches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy packing, longest first: a microbatch's padded size (B * max_len) stays <= max_tokens.

    A sequence longer than the budget gets a microbatch of its own (it cannot be split).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # first is the longest
        if current and width * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _per_token(values: list[float] | None, row: int, start: int, out: torch.Tensor | None) -> None:
    if out is not None and values is not None:
        out[row, start:start + len(values)] = torch.as_tensor(values, dtype=torch.float32)


def token_staleness(sample: Sample, index: int) -> list[int]:
    """policy_version - weight version of each response token: how many weight pushes behind the policy being
    trained (metadata["policy_version"], set by the driver) the sampling weights were. A sample without that
    version or without weight_versions counts as fresh (all 0). A token newer than the trained policy cannot
    exist; it is refused, naming the sample."""
    version = sample.metadata.get("policy_version")
    if version is None or not sample.weight_versions:
        return [0] * len(sample.response_ids)
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"sample {index}: metadata['policy_version'] must be an integer, got {version!r}")
    staleness = [version - v for v in sample.weight_versions]
    if min(staleness) < 0:
        raise ValueError(f"sample {index}: Sample.weight_versions has version {max(sample.weight_versions)}, newer "
                         f"than metadata['policy_version'] = {version} (the weights being trained)")
    return staleness


def collate(samples: list[Sample], indices: list[int]) -> MicroBatch:
    """Build the padded tensors of one microbatch (samples given in the caller's order)."""
    chosen = [samples[i] for i in indices]
    lengths = [len(s.tokens) for s in chosen]
    B, S = len(chosen), max(lengths)
    tokens = torch.zeros(B, S, dtype=torch.long)
    loss_mask = torch.zeros(B, S - 1)
    has_mu = all(s.rollout_logprobs for s in chosen)
    has_teacher = all(s.teacher_logprobs is not None for s in chosen)
    mu = torch.zeros(B, S - 1) if has_mu else None
    teacher = torch.zeros(B, S - 1) if has_teacher else None
    staleness = torch.zeros(B, S - 1, dtype=torch.long)
    for b, s in enumerate(chosen):
        tokens[b, :lengths[b]] = torch.as_tensor(s.tokens, dtype=torch.long)
        start, n = len(s.prompt_ids) - 1, len(s.response_ids)
        mask = s.loss_mask if s.loss_mask else [1] * n
        loss_mask[b, start:start + n] = torch.as_tensor(mask, dtype=torch.float32)
        _per_token(s.rollout_logprobs, b, start, mu)
        _per_token(s.teacher_logprobs, b, start, teacher)
        staleness[b, start:start + n] = torch.as_tensor(token_staleness(s, indices[b]), dtype=torch.long)
    orm = torch.as_tensor([float(s.orm_advantage) for s in chosen], dtype=torch.float32)
    # teachers.NAME.coef of each sample's teacher (mopd.teachers.TeacherSet.score records it; default 1)
    coef = torch.as_tensor([float(s.metadata.get("teacher_coef", 1.0)) for s in chosen], dtype=torch.float32)
    top_ids, top_lps = _collate_top_k(chosen, indices, S)
    return MicroBatch(
        indices=list(indices), tokens=tokens,
        position_ids=torch.arange(S, dtype=torch.long).unsqueeze(0).expand(B, S).contiguous(),
        targets=tokens[:, 1:].contiguous(),
        inputs=LossInputs(loss_mask=loss_mask, rollout_logprobs=mu, teacher_logprobs=teacher, orm_advantage=orm,
                          teacher_top_ids=top_ids, teacher_top_logprobs=top_lps, teacher_coef=coef,
                          staleness=staleness),
        prompt_lengths=[len(s.prompt_ids) for s in chosen],
    )


# Positions without a teacher distribution (prompt, padding) get token 0 at a negligible probability: the
# values stay finite (no NaN through the loss mask) and the loss mask zeroes them.
_NO_TOP_LOGPROB = -30.0


def _collate_top_k(chosen: list[Sample], indices: list[int], seq_len: int,
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """[B, S-1, k] teacher top-k ids and logprobs, aligned like the other per-token tensors."""
    if not chosen or not all(s.teacher_top_ids is not None and s.teacher_top_logprobs is not None for s in chosen):
        return None, None
    k = max((len(row) for s in chosen for row in s.teacher_top_ids), default=0)
    ids = torch.zeros(len(chosen), seq_len - 1, max(k, 1), dtype=torch.long)
    lps = torch.full((len(chosen), seq_len - 1, max(k, 1)), _NO_TOP_LOGPROB)
    for b, (i, s) in enumerate(zip(indices, chosen)):
        start = len(s.prompt_ids) - 1
        for t, (row_ids, row_lps) in enumerate(zip(s.teacher_top_ids, s.teacher_top_logprobs)):
            if len(row_ids) != k or len(row_lps) != k:
                raise ValueError(f"sample {i}: teacher top-k at response token {t} has {len(row_ids)} ids and "
                                 f"{len(row_lps)} logprobs, expected {k} of each (as the batch's other tokens)")
            ids[b, start + t] = torch.as_tensor(row_ids, dtype=torch.long)
            lps[b, start + t] = torch.as_tensor(row_lps, dtype=torch.float32)
    return ids, lps

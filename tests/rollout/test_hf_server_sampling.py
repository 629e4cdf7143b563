"""The local server's batched sampler: the right distribution, seeded rows independent of their batch,
and a broken row failing alone."""

from __future__ import annotations

import math

import pytest
import torch

from rollout.hf_server_sampling import RowSampling, sample_token, sample_tokens, sampling_probs

DRAWS = 20_000


def _frequencies(logits: torch.Tensor, row: RowSampling, draws: int = DRAWS) -> torch.Tensor:
    """Empirical distribution of `draws` tokens, drawn 50 rows at a time (each row its own generator state)."""
    counts = torch.zeros(logits.shape[-1])
    for _ in range(draws // 50):
        for tok in sample_tokens(logits.expand(50, -1), [row] * 50):
            counts[tok] += 1
    return counts / counts.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 1.0, -1), (1.0, 0.8, -1),
                                                      (1.0, 1.0, 3), (1.3, 0.9, 4)])
def test_draws_follow_sampling_probs(temperature: float, top_p: float, top_k: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(12) * 2
    row = RowSampling(temperature, top_p, top_k, torch.Generator().manual_seed(1))
    want = sampling_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k, banned=[])
    got = _frequencies(logits, row)
    sigma = torch.sqrt(want * (1 - want) / DRAWS)
    assert torch.all((got - want).abs() <= 5 * sigma + 1e-9), (got, want)
    assert torch.all(got[want == 0] == 0)  # truncated tokens are never drawn


def test_banned_and_zero_mass_tokens_never_drawn_at_either_end_of_the_vocab() -> None:
    logits = torch.zeros(6)
    logits[0] = logits[-1] = -math.inf  # no mass at the first and last token: u near 0 or near 1 must not pick them
    row = RowSampling(1.0, generator=torch.Generator().manual_seed(3), banned=[2])
    got = _frequencies(logits, row, draws=5_000)
    assert got[0] == got[-1] == got[2] == 0
    assert torch.all(got[[1, 3, 4]] > 0.25)
    assert sample_tokens(torch.tensor([[5.0, 1.0, 0.0]]), [RowSampling(0.0, banned=[0])]) == [1]  # greedy too


def test_seeded_row_is_the_same_alone_and_in_any_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(40, 30)

    def run(batch_rows: list[int]) -> list[int]:
        gen = torch.Generator().manual_seed(7)
        out = []
        for step in range(40):
            others = [RowSampling(1.0, generator=torch.Generator().manual_seed(100 + r)) for r in batch_rows]
            rows = [*others[:len(others) // 2], RowSampling(1.0, generator=gen), *others[len(others) // 2:]]
            picks = sample_tokens(torch.stack([logits[step]] * len(rows)), rows)
            out.append(picks[len(others) // 2])
        return out

    alone = run([])
    assert run([1, 2, 3]) == alone
    assert run(list(range(9))) == alone
    assert len(set(alone)) > 5  # it does sample


def test_a_broken_row_fails_alone() -> None:
    logits = torch.randn(4, 8)
    logits[1, 3] = float("nan")
    rows = [RowSampling(1.0, generator=torch.Generator().manual_seed(0)), RowSampling(1.0),
            RowSampling(1.0, banned=list(range(8))), RowSampling(0.0)]
    picks = sample_tokens(logits, rows)
    assert picks[1] is None and picks[2] is None
    assert isinstance(picks[0], int) and picks[3] == int(torch.argmax(logits[3]))
    with pytest.raises(ValueError, match="no probability mass"):
        sample_token(logits[1], temperature=1.0, top_p=1.0, top_k=-1, generator=None, banned=[])
    with pytest.raises(ValueError, match="4 rows of logits for 3 requests"):
        sample_tokens(logits, rows[:3])


def test_callers_logits_are_not_changed() -> None:
    logits = torch.randn(2, 5)
    before = logits.clone()
    sample_tokens(logits, [RowSampling(1.0, banned=[0, 1]), RowSampling(0.0, banned=[4])])
    assert torch.equal(logits, before)

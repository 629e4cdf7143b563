"""algo.teacher_temperature: teachers scored under their sharpened distribution pi^(1/tau) / Z."""

import asyncio
import math

import pytest
import torch

from mopd.core.algo import AdvantageConfig, sharpen_teacher_scores
from mopd.core.errors import ConfigError
from mopd.core.types import Sample, TokenScores
from mopd.teachers import TeacherRouter, TeacherSet


def _scores(logits: torch.Tensor, targets: list[int], support: int) -> TokenScores:
    logp = torch.log_softmax(logits.double(), -1)
    top = torch.topk(logp, support)
    return TokenScores(logprobs=[logp[i, t].item() for i, t in enumerate(targets)], top_ids=top.indices.tolist(),
                       top_logprobs=top.values.tolist())


def test_with_the_whole_vocabulary_as_support_the_scores_are_the_tempered_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 30) * 3, [0, 7, 29, 3, 3]
    for tau in (0.25, 0.5, 0.9):
        want = torch.log_softmax(logits.double() / tau, -1)
        got = sharpen_teacher_scores(_scores(logits, targets, 30), tau, keep_top_k=4)
        assert got.logprobs == pytest.approx([want[i, t].item() for i, t in enumerate(targets)], abs=1e-12)
        assert got.top_ids == [row[:4] for row in torch.topk(want, 30).indices.tolist()]
        torch.testing.assert_close(torch.tensor(got.top_logprobs, dtype=torch.float64), torch.topk(want, 4).values,
                                   atol=1e-12, rtol=0)


def test_a_truncated_support_errs_within_its_bound_and_only_towards_less_mass_on_top():
    torch.manual_seed(1)
    logits, targets = torch.randn(6, 50) * 2, [1, 2, 3, 4, 5, 6]
    tau = 0.5
    want = torch.log_softmax(logits.double() / tau, -1)
    exact = torch.tensor([want[i, t].item() for i, t in enumerate(targets)])
    for support in (3, 10, 25):
        got = torch.tensor(sharpen_teacher_scores(_scores(logits, targets, support), tau).logprobs)
        # Z gets the upper bound of the tail: the sharpened logprobs are never above the exact ones ...
        assert (got <= exact + 1e-12).all()
        # ... and below them by at most log(1 + bound / Z_top)
        logp = torch.log_softmax(logits.double(), -1)
        top = torch.topk(logp, support).values
        rest = 1 - top.exp().sum(-1)
        bound = rest * top[:, -1].exp() ** (1 / tau - 1)
        assert (exact - got <= torch.log1p(bound / (top / tau).exp().sum(-1)) + 1e-12).all()
    # with 25 of 50 tokens the sharpened teacher is already within 5e-3 nats (random logits: a flat teacher)
    assert (exact - got).abs().max() < 5e-3


def test_temperature_one_changes_nothing_and_keep_top_k_zero_returns_no_top_tokens():
    scores = _scores(torch.randn(2, 8), [1, 2], 4)
    assert sharpen_teacher_scores(scores, 1.0) is scores
    sharp = sharpen_teacher_scores(scores, 0.5)
    assert sharp.top_ids is None and sharp.top_logprobs is None and len(sharp.logprobs) == 2
    empty = sharpen_teacher_scores(TokenScores(logprobs=[], top_ids=[], top_logprobs=[]), 0.5, keep_top_k=3)
    assert empty.logprobs == [] and empty.top_ids == []


def test_scores_without_top_tokens_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="needs the teacher's top tokens"):
        sharpen_teacher_scores(TokenScores(logprobs=[-1.0, -2.0]), 0.5)


@pytest.mark.parametrize("field,value,expected", [
    ("teacher_temperature", 0.0, "in \\(0, 1\\]"), ("teacher_temperature", 1.5, "in \\(0, 1\\]"),
    ("teacher_temperature", math.nan, "in \\(0, 1\\]"), ("teacher_temperature_support", 0, "integer >= 1"),
    ("teacher_temperature_support", 2.5, "integer >= 1")])
def test_bad_teacher_temperature_settings_name_the_field(field, value, expected):
    with pytest.raises(ConfigError, match=f"algo.{field}.*{expected}"):
        AdvantageConfig(**{field: value}).validate()


class _Logits:
    """A custom teacher whose scores come from fixed logits (vocabulary 12); records the top_k it was asked for."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.asked: list[int] = []

    async def score(self, samples, top_k):
        self.asked.append(top_k)
        out = []
        for s in samples:
            scores = _scores(self.logits[:len(s.response_ids)], s.response_ids, max(top_k, 1))
            if not top_k:
                scores.top_ids = scores.top_logprobs = None
            out.append(scores)
        return out

    def close(self) -> None:
        pass


@pytest.mark.parametrize("top_k", [0, 3])
def test_teacher_set_asks_for_the_support_and_hands_on_the_sharpened_scores(top_k):
    torch.manual_seed(2)
    teacher = _Logits(torch.randn(4, 12) * 2)
    teachers = TeacherSet({"t": teacher}, TeacherRouter({"x": "t"}), temperature=0.5, temperature_support=12)
    sample = Sample(prompt_index=0, group_index=0, domain="x", prompt_ids=[1], response_ids=[2, 5, 11, 0])
    asyncio.run(teachers.score([sample], top_k=top_k))
    assert teacher.asked == [12]  # the whole vocabulary: exact
    want = torch.log_softmax(teacher.logits.double() / 0.5, -1)
    assert sample.teacher_logprobs == pytest.approx([want[i, t].item() for i, t in enumerate(sample.response_ids)])
    if top_k:
        assert [len(row) for row in sample.teacher_top_ids] == [3] * 4
        torch.testing.assert_close(torch.tensor(sample.teacher_top_logprobs, dtype=torch.float64),
                                   torch.topk(want, 3).values)
    else:
        assert sample.teacher_top_ids is None and sample.teacher_top_logprobs is None


def test_a_teacher_that_returns_no_top_tokens_under_a_temperature_fails_the_step_by_name():
    class NoTop(_Logits):
        async def score(self, samples, top_k):
            return [TokenScores(logprobs=[-1.0] * len(s.response_ids)) for s in samples]

    teachers = TeacherSet({"plain": NoTop(torch.zeros(1))}, TeacherRouter({"x": "plain"}), temperature=0.5)
    sample = Sample(prompt_index=0, group_index=0, domain="x", prompt_ids=[1], response_ids=[2])
    with pytest.raises(RuntimeError, match="teacher 'plain'.*top tokens"):
        asyncio.run(teachers.score([sample]))

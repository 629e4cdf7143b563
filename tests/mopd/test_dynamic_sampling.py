"""Dynamic sampling on hand-made groups: the scoring hook's verdict, pass rates, and prompts sampled less."""

import asyncio
import json
from collections import Counter

import pytest

from envs.toy_tasks import make_examples
from mopd.config import DataConfig, DynamicSamplingConfig
from mopd.core.types import Sample, TokenScores
from mopd.data import DataScheduler, load_prompts
from mopd.dynamic_sampling import GroupScorer, group_reverse_kl, has_signal
from mopd.teachers import TeacherRouter, TeacherSet
from mopd.toy.tokenizer import build_char_tokenizer


def _sample(group: int, reward: float = 0.0, mu=(-1.0, -1.0), teacher=None, mask=(1, 1), text: str = "",
            label=None, domain: str = "arith") -> Sample:
    return Sample(prompt_index=group, group_index=group, domain=domain, prompt_ids=[1], label=label,
                  response_ids=[5] * len(mu), loss_mask=list(mask), rollout_logprobs=list(mu),
                  weight_versions=[0] * len(mu), reward=reward, response_text=text,
                  teacher_logprobs=None if teacher is None else list(teacher), finish_reason="stop")


def test_reverse_kl_of_a_group_counts_loss_tokens_only():
    group = [_sample(0, mu=(-1.0, -2.0), teacher=(-1.5, -9.0), mask=(1, 0)),  # second token is tool output
             _sample(0, mu=(-0.5, -0.5), teacher=(-1.0, -2.0))]
    # tokens: 0.5, (masked), 0.5, 1.5 -> mean 2.5 / 3
    assert group_reverse_kl(group) == pytest.approx(2.5 / 3)
    assert group_reverse_kl([_sample(0)]) is None


@pytest.mark.parametrize("rewards, kl_per_token, uses_teachers, kept", [
    ((1.0, 0.0, 1.0), 0.0, False, True),  # rewards differ: GRPO signal
    ((1.0, 1.0, 1.0), 0.0, False, False),  # all solved, no teacher: nothing to learn
    ((0.0, 0.0, 0.0), 0.0, False, False),  # never solved
    ((0.0, 0.0, 0.0), 0.3, True, True),  # teacher still disagrees by 0.3 nats >= 0.1
    ((1.0, 1.0, 1.0), 0.05, True, False),  # the student already matches the teacher
    ((1.0, 1.0, 1.0), 0.1, True, True),  # at the threshold: kept
])
def test_a_group_without_signal_is_filtered(rewards, kl_per_token, uses_teachers, kept):
    group = [_sample(7, reward=r, mu=(-1.0, -1.0), teacher=(-1.0 - kl_per_token,) * 2) for r in rewards]
    assert has_signal(group, uses_teachers, kl_threshold=0.1) is kept


def _scheduler(tmp_path, **cfg) -> DataScheduler:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_examples("arith", 6, 0) + make_examples("reverse", 6, 0)))
    data = DataConfig(train_files=[str(path)], domain_weights={"arith": 1.0, "reverse": 1.0}, **cfg)
    return DataScheduler(load_prompts(data, build_char_tokenizer(), 100), data, group_size=3)


class _Teacher:
    """A teacher that gives every token log p = -1 (the student's tokens in these groups have log mu = -1)."""

    async def score(self, samples: list[Sample], top_k: int) -> list[TokenScores]:
        return [TokenScores(logprobs=[-1.0] * len(s.response_ids)) for s in samples]

    def close(self) -> None:
        pass


def _answered(data: DataScheduler, source: str, correct: int) -> list[Sample]:
    """The next group of `source` with `correct` of its responses the label, the rest wrong."""
    group = data.next_group(source)
    for i, sample in enumerate(group):
        sample.response_text = sample.label if i < correct else "wrong"
        sample.response_ids, sample.loss_mask = [5, 6], [1, 1]
        sample.rollout_logprobs, sample.weight_versions, sample.finish_reason = [-1.0, -1.0], [0, 0], "stop"
    return group


def test_scorer_scores_records_and_filters(tmp_path):
    data = _scheduler(tmp_path, pass_rate_weighting=True, pass_rate_min_samples=3)
    teachers = TeacherSet({"t": _Teacher()}, TeacherRouter({}, default_teacher="t"), coefs={"t": 2.0})
    scorer = GroupScorer(data, teachers, DynamicSamplingConfig(filter_groups=True, filter_kl_threshold=0.05))
    mixed, solved = _answered(data, "arith", correct=2), _answered(data, "reverse", correct=3)
    assert asyncio.run(scorer(mixed)) is True
    assert asyncio.run(scorer(solved)) is False  # all correct and KL 0 < 0.05: filtered
    assert [s.reward for s in mixed] == [1.0, 1.0, 0.0] and [s.reward for s in solved] == [1.0] * 3
    assert all(s.teacher_logprobs == [-1.0, -1.0] and s.metadata["teacher_coef"] == 2.0 for s in mixed + solved)
    assert scorer.metrics() == {"rollout/pass_rate/arith": pytest.approx(2 / 3), "rollout/pass_rate/reverse": 1.0}
    assert scorer.metrics() == {}  # counted once
    assert sorted(data.pass_rate(data._row_at_position(g[0].prompt_index)) for g in (mixed, solved)) == \
        [pytest.approx(2 / 3), 1.0]
    keep_all = GroupScorer(data, None, DynamicSamplingConfig(filter_groups=False))
    assert asyncio.run(keep_all(_answered(data, "reverse", correct=3))) is True


def test_group_source_draws_groups_per_source_with_quotas(tmp_path):
    data = _scheduler(tmp_path)
    assert data.quota(5) == {"arith": 3, "reverse": 2}
    group = data.next_group("reverse")
    assert len(group) == 3 and {s.group_index for s in group} == {group[0].prompt_index}
    assert {data.source_of(s) for s in group} == {"reverse"} and group[0].domain == "reverse"
    group[0].metadata["x"] = 1
    assert "x" not in group[1].metadata  # each sample its own metadata
    # next_group and the batch path share one stream: positions never repeat
    positions = [data.next_group("arith")[0].prompt_index for _ in range(3)]
    positions += [p for p, _ in data.next_prompts(4)]
    assert len(set(positions)) == len(positions)


def test_prompts_always_solved_are_sampled_less_and_resume_exactly(tmp_path):
    data = _scheduler(tmp_path, pass_rate_weighting=True, pass_rate_min_samples=3, pass_rate_keep=0.25)
    scorer = GroupScorer(data, None, DynamicSamplingConfig())
    solved_rows = set()
    for _ in range(6):  # one epoch of arith: rows 0-2 of the draw order always solved, the others half
        group = _answered(data, "arith", correct=3 if len(solved_rows) < 3 else 1)
        if len(solved_rows) < 3:
            solved_rows.add(data._row_at_position(group[0].prompt_index))
        asyncio.run(scorer(group))
    state = json.loads(json.dumps(data.state_dict()))
    draws = [data._row_at_position(data.next_group("arith")[0].prompt_index) for _ in range(300)]
    counts = Counter(draws)
    solved = sum(counts[r] for r in solved_rows) / 3
    others = sum(c for r, c in counts.items() if r not in solved_rows) / 3
    assert solved < 0.5 * others  # kept with chance 0.25 when their turn comes
    again = _scheduler(tmp_path, pass_rate_weighting=True, pass_rate_min_samples=3, pass_rate_keep=0.25)
    again.load_state_dict(state)
    assert [again._row_at_position(again.next_group("arith")[0].prompt_index) for _ in range(300)] == draws
    off = _scheduler(tmp_path)  # weighting off (the default): no rewards kept, every row in turn
    off.record_outcomes(group)
    assert off.outcomes == {} and off.state_dict()["outcomes"] == {}


def test_a_checkpoint_of_counts_only_still_loads(tmp_path):
    data = _scheduler(tmp_path)
    data.load_state_dict({"arith": 4, "reverse": 2})  # written before pass rates were kept
    assert data.state_dict() == {"consumed": {"arith": 4, "reverse": 2}, "outcomes": {}}


def test_a_long_run_of_filtered_groups_is_warned_about(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("mopd.dynamic_sampling.WARN_EVERY", 3)
    data = _scheduler(tmp_path)
    scorer = GroupScorer(data, None, DynamicSamplingConfig(filter_groups=True))
    verdicts = [asyncio.run(scorer(_answered(data, "arith", correct=0))) for _ in range(5)]
    assert verdicts == [False] * 5
    assert len([r for r in caplog.records if "filtered the last 3 groups" in r.getMessage()]) == 1
    assert asyncio.run(scorer(_answered(data, "arith", correct=1))) is True and scorer._filtered_in_a_row == 0

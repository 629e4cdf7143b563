"""`anagram` and `shuffle`: long answers with many right ones, graded by any ordering of the prompt's items."""

from __future__ import annotations

import pytest

from envs.toy_tasks import ANY_ORDER_DOMAINS, END_OF_TURN, any_order_reward, make_examples
from mopd.eval_cli import default_max_new_tokens
from mopd.rewards import verifier_for
from mopd.toy.tokenizer import build_char_tokenizer
from mopd.toy.world import check_toy_domains


def _items(row: dict) -> str:
    return row["prompt"][0]["content"].split(":", 1)[1]


@pytest.mark.parametrize("domain", ANY_ORDER_DOMAINS)
def test_every_round_is_an_ordering_of_the_prompts_distinct_items_and_orderings_differ(domain: str):
    check_toy_domains([domain])
    tok = build_char_tokenizer()
    rows = make_examples(domain, 50, seed=5)
    assert rows == make_examples(domain, 50, seed=5)
    orderings = set()
    for row in rows:
        items, rounds = _items(row), row["label"].split(",")
        assert len(set(items)) == len(items) == 8 and len(rounds) == 4
        assert all(sorted(r) == sorted(items) for r in rounds)
        assert 30 <= len(tok(row["label"], add_special_tokens=False)["input_ids"]) <= 100
        orderings.update(rounds)
    assert len(orderings) > 190  # 200 rounds drawn from 8! orderings: the teachers see many right answers
    assert default_max_new_tokens({domain: rows}) == 40


@pytest.mark.parametrize("domain", ANY_ORDER_DOMAINS)
def test_any_ordering_is_right_and_a_repeat_missing_or_foreign_item_is_not(domain: str):
    row = make_examples(domain, 1, seed=0)[0]
    label, items = row["label"], _items(row)
    grade = verifier_for(domain)
    other = ",".join([items, items[::-1], items[1:] + items[0], items])
    assert grade(other + END_OF_TURN, label) == 1.0
    repeat = items[:-1] + items[0]
    foreign = items[:-1] + next(c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c not in items)
    for bad in (",".join([items] * 3 + [repeat]), ",".join([items] * 3 + [foreign]), ",".join([items] * 3),
                ",".join([items] * 5), ",".join([items] * 3 + [items[:-1]]), "", ",,,"):
        assert grade(bad + END_OF_TURN, label) == 0.0, bad


def test_text_after_the_end_of_turn_is_ignored_and_hostile_answers_score_nothing():
    label = "abcdefgh,hgfedcba,abcdefgh,hgfedcba"
    assert any_order_reward("hgfedcba,abcdefgh,badcfehg,abcdefgh" + END_OF_TURN + "junk", label) == 1.0
    assert any_order_reward("x" * 100_000, label) == 0.0
    assert any_order_reward("abcdefgh," * 10_000, label) == 0.0


def test_leak_stats_reward_is_zero_when_the_teacher_is_the_student(tmp_path):
    from benchmarks.long_answers.leaks import leak_stats
    from mopd.toy.models import create_tiny_model

    model = create_tiny_model(tmp_path / "m", build_char_tokenizer(), arch="qwen3_moe", seed=0, hidden_size=32,
                              num_layers=1)
    stats = leak_stats(model, model, make_examples("shuffle", 3, seed=0), samples=2)
    assert stats["answers"] == 6 and stats["item_positions"] >= 6
    assert 0 < stats["answers_with_a_leak"] <= 1  # a random model repeats or strays almost at once
    assert stats["student_mass_outside_valid"] == pytest.approx(stats["teacher_mass_outside_valid"])
    assert stats["reward_valid_token"] == pytest.approx(0, abs=1e-5)
    assert stats["reward_leak_token"] == pytest.approx(0, abs=1e-5)

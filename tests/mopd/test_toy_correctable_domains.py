"""shiftfix/rotfix: the long rounds with `!` corrections; the grammar, its verifier, and teachers that recover."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.toy_tasks import (
    CORRECTABLE_DOMAINS,
    apply_corrections,
    corrected_match_reward,
    exact_match_reward,
    make_examples,
    with_slips,
)
from mopd.rewards import verifier_for
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from mopd.toy.world import MANIFEST, ToyWorldSpec, check_toy_domains, recovery_sequence, sft, toy_world_ready

LABEL = "quvvdy,rvwwez,swxxfa,txyygb,uyzzhc"


def test_correctable_domains_are_the_long_rounds_with_their_own_prompt():
    check_toy_domains(CORRECTABLE_DOMAINS)
    rules = {"shiftfix": lambda c: chr((ord(c) - 97 + 1) % 26 + 97), "rotfix": lambda c: str((int(c) + 3) % 10)}
    for domain, step in rules.items():
        for row in make_examples(domain, 5, seed=2):
            prefix, word = row["prompt"][0]["content"].split(":")
            assert prefix == domain and len(row["label"].split(",")) == 5
            for rnd in row["label"].split(","):
                word = "".join(map(step, word))
                assert rnd == word


def test_a_withdrawn_round_is_dropped_and_a_corrected_answer_scores_like_a_clean_one():
    verify = verifier_for("shiftfix")
    assert verify(LABEL + "<|im_end|>", LABEL) == 1.0
    assert apply_corrections("quvvdy,rvwxez!rvwwez,swxxfa") == "quvvdy,rvwwez,swxxfa"
    for corrected in ("quvvdy,rvwxez!rvwwez,swxxfa,txyygb,uyzzhc",  # a whole round withdrawn
                      "quvvdy,rvx!rvwwez,swxxfa,txyygb,uyzzhc",  # a partial round
                      "quvvdy,r!rvw!rvwwez,swxxfa,txyygb,uyzzhc",  # twice
                      "quvvdy,rvwwez,swxxfa,txyygb,uyzzhd!uyzzhc"):  # the last round
        assert verify(corrected + "<|im_end|>", LABEL) == 1.0, corrected
    assert verify("quvvdy,rvwxez!rvwxez,swxxfa,txyygb,uyzzhc", LABEL) == 0.0  # corrected to a wrong round
    assert verify("quvvdy,rvwwez,swxxfa,txyygb,uyzzhc!", LABEL) == 0.0  # the last round withdrawn, not rewritten
    assert verifier_for("shift")("quvvdy,rvx!rvwwez,swxxfa,txyygb,uyzzhc", LABEL) == 0.0  # plain shift: no grammar
    assert verifier_for("rotfix") is corrected_match_reward and verifier_for("arith") is exact_match_reward


@pytest.mark.parametrize("answer", ["!", "!!", "!" + LABEL, "quvvdy,!rvwwez,swxxfa,txyygb,uyzzhc",
                                    "quvvdy,rvx!!rvwwez,swxxfa,txyygb,uyzzhc", "," * 4, "", "!" * 10_000])
def test_hostile_answers_score_nothing(answer: str):
    assert corrected_match_reward(answer + "<|im_end|>", LABEL) == 0.0


def test_a_very_long_answer_is_graded_in_linear_time_and_only_its_last_attempt_counts():
    noise = "x!" * 200_000
    assert corrected_match_reward(",".join(noise + w for w in LABEL.split(",")), LABEL) == 1.0
    assert corrected_match_reward(LABEL + ",abcdef" * 100_000, LABEL) == 0.0


def test_slipped_answers_grade_right_and_mask_only_the_slips():
    rng = random.Random(0)
    tok = build_char_tokenizer()
    (row,) = make_examples("shiftfix", 1, seed=0)
    seen_slip = 0
    for _ in range(50):
        pieces = with_slips(row["label"], "abcdefghijklmnopqrstuvwxyz", 0.3, rng)
        text = "".join(t for t, _ in pieces)
        assert corrected_match_reward(text, row["label"]) == 1.0
        slips = [t for t, slip in pieces if slip]
        assert all(len(t) == 1 for t in slips) and text.count("!") == len(slips)
        seen_slip += len(slips)
    assert seen_slip > 0
    assert with_slips(row["label"], "abc", 0.0, rng) == [(r if i == 0 else "," + r, False)
                                                          for i, r in enumerate(row["label"].split(","))]
    ids, mask = recovery_sequence(tok, row, 1.0, random.Random(1))  # every round slips
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    masked = [tok.decode([t]) for t, m in zip(ids, mask) if not m][-5:]  # the slips, after the prompt
    assert trained.count("!") == 5 and all(len(c) == 1 and c not in "!," for c in masked)
    assert trained.replace("!", "") != row["label"] + "<|im_end|>"  # each slipped round is written twice


def test_the_option_is_off_by_default_and_worlds_built_before_it_still_match(tmp_path: Path):
    spec = ToyWorldSpec(domains=("shift", "rot"))
    old = {k: v for k, v in dataclasses.asdict(spec).items() if k != "recovery_prob"}  # a manifest from before
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    assert spec.recovery_prob == 0.0 and toy_world_ready(tmp_path, spec)
    assert not toy_world_ready(tmp_path, dataclasses.replace(spec, recovery_prob=0.2))


@pytest.mark.slow
def test_a_teacher_trained_with_slips_notices_them_and_never_marks_a_correct_round(tmp_path: Path):
    """Rounds that slip (loss-masked) 20% of the time: after 1200 steps of shiftfix from a random init, `!`
    follows a slipped character far more often than a correct round or character (measured: 0.44 vs 0.01)."""
    tok = build_char_tokenizer()
    create_tiny_model(tmp_path / "init", tok, arch="qwen3_moe", seed=0, hidden_size=64, num_layers=2)
    spec = ToyWorldSpec(domains=("shiftfix",), recovery_prob=0.2)
    sft(tmp_path / "init", tmp_path / "teacher", ("shiftfix",), 1200, spec, seed=1)
    tok = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    bang, rng = tok.convert_tokens_to_ids("!"), random.Random(5)

    def p_bang(text: str) -> float:
        with torch.no_grad():
            return model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1].softmax(-1)[
                bang].item()

    after_slip, after_correct = [], []
    for row in make_examples("shiftfix", 40, seed=99):
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        first = row["label"].split(",")[0]
        k = rng.randrange(len(first))
        slip = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != first[k]])
        after_slip.append(p_bang(prompt + first[:k] + slip))
        after_correct += [p_bang(prompt + first), p_bang(prompt + first[:k + 1])]
    mean_slip, mean_correct = sum(after_slip) / len(after_slip), sum(after_correct) / len(after_correct)
    assert mean_slip > 0.2 and mean_correct < 0.05 and mean_slip > 8 * mean_correct, (mean_slip, mean_correct)

"""The long-answer toy domains are first-class toy domains: world, config, verifier, tokenizer."""

from __future__ import annotations

from envs.toy_tasks import LONG_ANSWER_DOMAINS, TOY_DOMAINS, make_examples
from mopd.rewards import verifier_for
from mopd.toy.tokenizer import build_char_tokenizer
from mopd.toy.world import check_toy_domains
from mopd.train import check_command_line


def test_long_domains_are_toy_domains_with_an_exact_verifier():
    check_toy_domains(LONG_ANSWER_DOMAINS)
    assert set(LONG_ANSWER_DOMAINS) <= set(TOY_DOMAINS)
    for domain in LONG_ANSWER_DOMAINS:
        row = make_examples(domain, 1, seed=0)[0]
        assert verifier_for(domain)(row["label"] + "<|im_end|>", row["label"]) == 1.0
        assert verifier_for(domain)(row["label"][:-1] + "<|im_end|>", row["label"]) == 0.0


def test_every_character_of_the_long_domains_is_one_existing_token():
    tok = build_char_tokenizer()
    unk = tok.unk_token_id
    for domain in LONG_ANSWER_DOMAINS:
        for row in make_examples(domain, 20, seed=1):
            text = row["prompt"][0]["content"] + row["label"]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text) and unk not in ids


def test_a_toy_run_on_the_long_domains_is_a_valid_config():
    teachers = []
    for d in LONG_ANSWER_DOMAINS:
        teachers += [f"+teacher@teachers.{d}=toy_arith", f"teachers.{d}.domains=[{d}]",
                     f"teachers.{d}.model_path=${{toy.dir}}/teacher_{d}"]
    job = check_command_line(["run_dir=/tmp/mopd-toy-long-test", "experiment=dry_run", "toy.domains=[shift,rot]",
                              "~teachers.arith", "~teachers.reverse", *teachers, "~data.domain_weights.arith", "~data.domain_weights.reverse",
                              "rollout.max_new_tokens=40", "eval_interval=5"])
    assert job.toy.domains == ["shift", "rot"] and job.eval_interval == 5

"""Held-out reverse KL to a teacher (mopd.evaluate.reverse_kl_to_teacher) on tiny real checkpoints: zero against
itself, and each left-padded batched row equal to that row computed alone by hand."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.toy_tasks import make_examples
from mopd.evaluate import reverse_kl_to_teacher
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two random tiny models; the first's end-of-turn logit is raised so that its responses end at different
    lengths (some end early, some run to max_new_tokens), as trained ones do."""
    root = tmp_path_factory.mktemp("rkl")
    tok = build_char_tokenizer()
    student, teacher = (create_tiny_model(root / f"m{i}", tok, arch="qwen3", seed=i) for i in range(2))
    model = AutoModelForCausalLM.from_pretrained(student)
    model.lm_head.weight.data[tok.eos_token_id] += 0.1
    model.save_pretrained(student)
    return student, teacher


def test_a_model_is_at_zero_reverse_kl_to_itself(pair):
    rows = {"arith": make_examples("arith", 3, 1)}
    result = reverse_kl_to_teacher(pair[0], pair[0], rows, samples=2, max_new_tokens=5)
    assert result["arith"]["tokens"] > 0
    assert abs(result["arith"]["reverse_kl"]) < 1e-6


@torch.no_grad()
def _by_hand(student_dir, teacher_dir, rows, max_new_tokens):
    """One row at a time, no padding: greedy response up to its end of turn, then sum_v p (log p - log q) per
    position, written out position by position."""
    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    total, tokens, ended = 0.0, 0, 0
    for row in rows:
        ids = tok(tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
                  return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = student.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0]
        response = out[ids.shape[1]:].tolist()
        if tok.eos_token_id in response:
            response = response[:response.index(tok.eos_token_id) + 1]
            ended += 1
        seq = torch.tensor([ids[0].tolist() + response])
        p_logits, q_logits = student(seq).logits[0], teacher(seq).logits[0]
        for i in range(len(response)):
            p = torch.softmax(p_logits[ids.shape[1] - 1 + i], -1)
            q = torch.softmax(q_logits[ids.shape[1] - 1 + i], -1)
            total += float((p * (p.log() - q.log())).sum())
            tokens += 1
    assert 0 < ended < len(rows)  # the mask past the end of turn is exercised
    return total / tokens, tokens


def test_batched_left_padded_rows_equal_each_row_alone(pair):
    # prompts of different lengths, so the batch is left-padded; a near-zero temperature makes the draws greedy
    rows = make_examples("arith", 3, 2) + make_examples("reverse", 3, 2)
    assert len({len(str(r["prompt"])) for r in rows}) > 1
    want, want_tokens = _by_hand(pair[0], pair[1], rows, max_new_tokens=12)
    got = reverse_kl_to_teacher(pair[0], pair[1], {"mixed": rows}, samples=1, max_new_tokens=12,
                                temperature=1e-4)["mixed"]
    assert got["tokens"] == want_tokens
    assert got["reverse_kl"] == pytest.approx(want, rel=1e-4)
    assert want > 0.01  # two different random models: the check is not 0 == 0


def test_evaluate_with_a_teacher_reports_the_kl_of_its_own_sampled_draws(pair):
    """mopd-eval --teacher: one set of draws gives both the accuracy and the KL; the draws, and so the accuracy,
    are those of an evaluation without a teacher, and the KL that of reverse_kl_to_teacher on the same seed."""
    from mopd.evaluate import evaluate

    rows = {"arith": make_examples("arith", 4, 3), "reverse": make_examples("reverse", 4, 3)}
    plain = evaluate(pair[0], rows, max_new_tokens=6, samples=2, seed=5)
    both = evaluate(pair[0], rows, max_new_tokens=6, samples=2, seed=5, teacher=pair[1])
    alone = reverse_kl_to_teacher(pair[0], pair[1], rows, samples=2, max_new_tokens=6, seed=5)
    for domain in rows:
        assert {k: v for k, v in both[domain].items() if k != "reverse_kl"} == plain[domain]
        assert both[domain]["reverse_kl"] == pytest.approx(alone[domain]["reverse_kl"], rel=1e-6)
        assert both[domain]["reverse_kl"] > 0.01


def test_a_teacher_with_another_vocabulary_is_refused_before_any_generation(pair, tmp_path):
    tok = build_char_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(200)])  # past the padded vocabulary
    bigger = create_tiny_model(tmp_path / "bigger", tok, arch="qwen3", seed=3)
    with pytest.raises(ValueError, match="teacher: its vocabulary"):
        reverse_kl_to_teacher(pair[0], bigger, {"arith": make_examples("arith", 1, 0)}, samples=1)

"""Checkpoint merging (average, task arithmetic) and per-domain evaluation on tiny real checkpoints."""

import json

import pytest
import torch

from mopd.evaluate import evaluate, load_eval_rows
from mopd.merge import average, load_state, task_arithmetic
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from envs.toy_tasks import make_examples


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    tok = build_char_tokenizer()
    return [create_tiny_model(root / f"m{i}", tok, arch="qwen3", seed=i) for i in range(3)]


def test_average_and_task_arithmetic_by_hand(ckpts, tmp_path):
    base, a, b = (load_state(p) for p in ckpts)
    avg = load_state(average(ckpts[1:], tmp_path / "avg"))
    ta = load_state(task_arithmetic(ckpts[0], ckpts[1:], tmp_path / "ta", scale=0.5))
    for k in base:
        torch.testing.assert_close(avg[k], (a[k] + b[k]) / 2)
        torch.testing.assert_close(ta[k], base[k] + 0.5 * ((a[k] - base[k]) + (b[k] - base[k])))
    assert (tmp_path / "avg" / "config.json").is_file() and (tmp_path / "avg" / "tokenizer.json").is_file()


def test_merging_different_architectures_is_refused(ckpts, tmp_path):
    other = create_tiny_model(tmp_path / "moe", build_char_tokenizer(), arch="qwen3_moe")
    with pytest.raises(ValueError, match="same tensors"):
        average([ckpts[0], other], tmp_path / "bad")


def test_evaluate_reports_greedy_and_sampled_accuracy_per_domain(ckpts, tmp_path):
    path = tmp_path / "test.jsonl"
    rows = make_examples("arith", 4, 1) + make_examples("reverse", 4, 1)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_eval_rows(path, per_domain=3)
    assert {d: len(r) for d, r in loaded.items()} == {"arith": 3, "reverse": 3}
    result = evaluate(ckpts[0], loaded, max_new_tokens=4, samples=2)
    assert set(result) == {"arith", "reverse"}
    for scores in result.values():  # an untrained model gets nothing right
        assert scores == {"greedy": 0.0, "sampled": 0.0, "pass@1": 0.0, "pass@2": 0.0, "prompts": 3}

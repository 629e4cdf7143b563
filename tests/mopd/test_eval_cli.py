"""`mopd-eval`: checkpoint resolution, the table and JSON, pass@k by hand, and argument errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.toy_tasks import END_OF_TURN, make_examples
from mopd.eval_cli import main, resolve_checkpoint
from mopd.evaluate import pass_at_k
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("eval") / "m", build_char_tokenizer(), arch="qwen3")


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 4, 1, 1.0), (4, 1, 1, 0.25), (4, 1, 4, 1.0), (4, 2, 2, 1 - 1 / 6), (5, 1, 2, 0.4),
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_checkpoint_resolution(model_dir, tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_3"
    (step / "hf").mkdir(parents=True)
    for f in model_dir.iterdir():
        (step / "hf" / f.name).symlink_to(f)
    (run / "checkpoints" / "step_12").mkdir()  # an unfinished checkpoint (no hf/ export) is skipped
    assert resolve_checkpoint(model_dir) == model_dir
    assert resolve_checkpoint(step) == step / "hf"
    assert resolve_checkpoint(run) == step / "hf"
    with pytest.raises(ValueError, match="CHECKPOINT"):
        resolve_checkpoint(tmp_path / "nothing")


def test_greedy_sampled_and_pass_at_k_on_labels_the_model_answers(model_dir, tmp_path, capsys):
    """Labels set to the model's own greedy answers: greedy is 1, and pass@K >= pass@1 = sampled."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = make_examples("arith", 3, 5)
    for row in rows:
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        row["label"] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False).split(END_OF_TURN)[0].strip()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_json = tmp_path / "res.json"
    assert main([str(model_dir), "--data", str(data), "--samples", "3", "--max-new-tokens", "4",
                 "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())["results"]["arith"]
    assert res["greedy"] == 1.0 and res["prompts"] == 3
    assert res["pass@1"] == pytest.approx(res["sampled"]) and res["pass@3"] >= res["pass@1"]
    assert "pass@3" in capsys.readouterr().out


def test_teacher_adds_reverse_kl_per_domain(model_dir, tmp_path, capsys):
    """Against itself the checkpoint is at 0; against another model it is not (the function itself is checked
    by hand in test_reverse_kl_eval.py)."""
    other = create_tiny_model(tmp_path / "other", build_char_tokenizer(), arch="qwen3", seed=7)
    for teacher, zero in ((model_dir, True), (other, False)):
        out_json = tmp_path / "kl.json"
        assert main([str(model_dir), "--domains", "arith,sort", "--n", "3", "--samples", "2", "--max-new-tokens",
                     "4", "--teacher", str(teacher), "--json", str(out_json)]) == 0
        saved = json.loads(out_json.read_text())
        assert saved["teacher"] == str(teacher) and set(saved["results"]) == {"arith", "sort"}
        for res in saved["results"].values():
            assert (abs(res["reverse_kl"]) < 1e-6) if zero else res["reverse_kl"] > 1e-3
    assert "reverse_kl" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["{model}"], "--data FILE or --domains"),
    (["{model}", "--domains", "arith", "--teacher", "{tmp}"], "--teacher: CHECKPOINT"),
    (["{model}", "--domains", "nope"], "unknown toy domains"),
    (["{tmp}"], "CHECKPOINT"),
    (["{model}", "--domains", "arith", "--data", "{data}"], "have no rows"),
])
def test_bad_arguments_exit_2_naming_the_argument(model_dir, tmp_path, capsys, argv, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(make_examples("reverse", 1, 0)[0]) + "\n")
    argv = [a.format(model=model_dir, tmp=tmp_path, data=data) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().out


def test_cli_entry_point_runs_the_toy_domains(model_dir, tmp_path):
    out_json = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "mopd.eval_cli", str(model_dir), "--domains", "arith,sort",
                           "--n", "2", "--samples", "2", "--max-new-tokens", "3", "--json", str(out_json)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(out_json.read_text())["results"]) == {"arith", "sort"}
    bad = subprocess.run([sys.executable, "-m", "mopd.eval_cli", str(model_dir), "--samples", "0"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--samples" in bad.stderr


def test_long_answer_domains_get_room_for_their_answers():
    from mopd.eval_cli import default_max_new_tokens

    assert default_max_new_tokens({"arith": []}) == 12
    assert default_max_new_tokens({"arith": [], "shift": []}) == 40
    assert default_max_new_tokens({"rotfix": [], "shift": []}) == 56

"""benchmarks/long_answers: the long-answer domains, the statistics, and a shortened run of the real pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.long_answers.report import kl_table, mean_ci, paired
from envs.toy_tasks import LONG_ANSWER_DOMAINS, exact_match_reward, make_examples
from mopd.toy.tokenizer import build_char_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "long_answers"


@pytest.mark.parametrize("domain", LONG_ANSWER_DOMAINS)
def test_long_answers_are_30_plus_tokens_written_round_by_round_and_checked_exactly(domain: str):
    tok = build_char_tokenizer()
    rows = make_examples(domain, 50, seed=3)
    assert rows == make_examples(domain, 50, seed=3) and rows != make_examples(domain, 50, seed=4)
    for row in rows:
        label = row["label"]
        assert 30 <= len(tok(label, add_special_tokens=False)["input_ids"]) <= 100
        rounds = label.split(",")
        assert len(rounds) == 5 and len(set(map(len, rounds))) == 1
        assert exact_match_reward(label + "<|im_end|>", label) == 1.0
        slip = rounds[0][:-1] + ("a" if rounds[0][-1] != "a" else "b") + label[len(rounds[0]):]
        assert exact_match_reward(slip, label) == 0.0  # one wrong character anywhere sinks the answer


def test_shift_and_rot_apply_their_rule_every_round():
    (shift,) = make_examples("shift", 1, seed=0)
    word = shift["prompt"][0]["content"].split(":")[1]
    for rnd in shift["label"].split(","):
        assert rnd == "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)
        word = rnd
    (rot,) = make_examples("rot", 1, seed=0)
    digits = rot["prompt"][0]["content"].split(":")[1]
    for rnd in rot["label"].split(","):
        assert rnd == "".join(str((int(c) + 3) % 10) for c in digits)
        digits = rnd


def test_confidence_interval_and_paired_comparison():
    mean, half = mean_ci([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert mean_ci([0.5]) == (0.5, 0.0)
    res = paired([0.9, 0.95, 1.0], [0.7, 0.8, 0.8])  # differences 0.2, 0.15, 0.2
    assert res["mean_diff"] == pytest.approx(0.55 / 3) and res["ahead"] and res["n"] == 3
    assert not paired([0.9, 0.7, 1.0], [0.8, 0.8, 0.8])["ahead"]
    assert not paired([0.9], [0.1])["ahead"]  # one seed: no interval, so no claim


def test_kl_table_has_a_row_per_method_that_has_the_kl_and_the_mean_of_domains():
    runs = {"a": [{"x": {"reverse_kl": 0.1}, "y": {"reverse_kl": 0.3}}, {"x": {"reverse_kl": 0.2}, "y": {"reverse_kl": 0.2}}],
            "no kl": [{"x": {"greedy": 1.0}, "y": {"greedy": 1.0}}]}
    table = kl_table(runs, ["x", "y"])
    assert "no kl" not in table
    (row,) = [line for line in table.splitlines() if line.startswith("| a |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2].startswith("0.150 ± ") and cells[4].startswith("0.200 ± 0.000")


@pytest.mark.slow
@pytest.mark.parametrize(("domains", "metric"), [("long", "greedy"), ("any", "sampled")])
def test_quick_benchmark_writes_tables_with_cis_selection_curves_and_plot(tmp_path: Path, domains: str, metric: str):
    """Many right answers (`any`) are compared, selected and plotted on sampled accuracy, the others on greedy."""
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out), "--methods", "mopd",
                           "--seeds", "2", "--domains", domains], capture_output=True, text=True, timeout=900, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    headline = "MOPD (report): sampled-token reverse KL + outcome"
    assert md.index(headline) < md.index("Merge: weight average")  # the report's method leads the methods
    assert f"Paired comparison (same seeds), normalized {metric} score" in md and result["paired"]["n"] == 2
    assert result["paired"]["metric"] == metric and f"validation_{metric}" in result["selection"]["mopd"]
    assert result["selection"]["mopd"]["lr"] in result["lrs"]
    assert len(result["runs"][headline]) == 2 and len(result[f"normalized_{metric}"][headline]) == 2
    for seed_curve in result["curves"][headline]:
        tokens = [p[0] for p in seed_curve]
        assert len(seed_curve) >= 3 and tokens[0] == 0 and tokens == sorted(tokens)
        assert tokens[-1] >= result["setup"]["budget"], "the run stopped before its sampled-token budget"
    for name in result["runs"]:
        for res in result["runs"][name]:
            assert set(res) == set(result["setup"]["world"]["domains"])
            assert all(0 <= res[d][k] <= 1 for d in res for k in ("greedy", "sampled"))
            assert all(res[d]["reverse_kl"] >= -1e-6 for d in res)  # KL to the domain's teacher, same draws
    assert "Reverse KL to the domain's teacher" in md and f"| {headline} | 2 |" in md.split("Reverse KL")[1]
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_correctable_domains_replace_the_configs_teachers_in_a_valid_job(tmp_path: Path):
    from benchmarks.long_answers.run import FIX_MAX_NEW_TOKENS, teacher_args
    from benchmarks.mopd_vs_baselines.world import World
    from mopd.toy.models import create_tiny_model
    from mopd.train import check_command_line

    world, tok = World(tmp_path / "world"), build_char_tokenizer()
    for path in (world.student, world.teacher("shiftfix"), world.teacher("rotfix")):
        create_tiny_model(path, tok, arch="qwen3_moe", seed=0, hidden_size=32, num_layers=1)
    world.train_file.parent.mkdir(parents=True)
    rows = make_examples("shiftfix", 4, seed=0) + make_examples("rotfix", 4, seed=0)
    for f in (world.train_file, world.test_file):
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = check_command_line(["experiment=mopd_long", f"run_dir={tmp_path / 'run'}", f"student.model_path={world.student}",
                              f"data.train_files=[{world.train_file}]", f"eval.files=[{world.test_file}]",
                              f"rollout.max_new_tokens={FIX_MAX_NEW_TOKENS}",
                              *teacher_args(world, ["shiftfix", "rotfix"])])
    assert set(job.teachers) == {"shiftfix", "rotfix"} and dict(job.data.domain_weights) == {"shiftfix": 1.0, "rotfix": 1.0}
    for d in ("shiftfix", "rotfix"):
        assert list(job.teachers[d].domains) == [d] and str(job.teachers[d].model_path) == str(world.teacher(d))
    plain = teacher_args(world, ["shift", "rot"])
    assert plain == [f"teachers.{d}.model_path={world.teacher(d)}" for d in ("shift", "rot")]

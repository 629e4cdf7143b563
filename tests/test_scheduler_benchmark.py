"""benchmarks/scheduler: the heavy-tailed echo workload, the benchmark's arithmetic, and a shortened real run."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scheduler.report import summarize_run, table
from envs.toy_tasks import ECHO_MAX, exact_match_reward, make_examples

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scheduler"


def test_echo_lengths_are_heavy_tailed_and_answers_checked_exactly():
    rows = make_examples("echo", 2000, seed=0)
    assert rows == make_examples("echo", 2000, seed=0) and rows != make_examples("echo", 2000, seed=1)
    lengths = [len(r["label"]) for r in rows]
    median = statistics.median(lengths)
    assert 5 <= median <= 7 and max(lengths) == ECHO_MAX >= 8 * median - 1
    assert statistics.fmean(lengths) > median * 1.3  # skewed: a long tail, not a spread around the median
    for row in rows[:50]:
        question, label = row["prompt"][0]["content"], row["label"]
        assert question == f"echo:{label}" and label.isalpha() and row["domain"] == "echo"
        assert exact_match_reward(label + "<|im_end|>", label) == 1.0
        assert exact_match_reward(label[:-1] + "<|im_end|>", label) == 0.0


def _fake_run(tmp_path: Path) -> Path:
    """A run directory as mopd-train and the probe leave it: 3 steps logged at t = 10, 12, 14 s."""
    rows = [{"step": i, "rollout/samples": 8, "rollout/tokens": 80, "rollout/total_tokens": 80 * (i + 1),
             "time/train_s": 0.5, "mopd/reverse_kl/echo": 1.0 - 0.1 * i, "rollout/reward/echo": 0.1 * i,
             "rollout/staleness_mean": 0.5} for i in range(3)]
    for i, drift in ((1, 0.01), (2, 0.03)):  # logged only by steps that trained tokens one version old
        rows[i]["train/kl_rollout/staleness_1"] = drift
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # one engine, running 4, then 0, then 8 requests; 40 forward steps over the window
    ticks = [{"t": 10.0, "running": {"u": 4}, "forward_steps": {"u": 100}},
             {"t": 12.0, "running": {"u": 0}, "forward_steps": {"u": 120}},
             {"t": 14.0, "running": {"u": 8}, "forward_steps": {"u": 140}},
             {"t": 20.0, "running": {"u": 8}, "forward_steps": {"u": 999}}]  # after the last step: outside
    (tmp_path / "probe.json").write_text(json.dumps({"line_times": [10.0, 12.0, 14.0], "ticks": ticks}))
    return tmp_path


def test_summary_measures_the_window_between_the_first_and_last_step_records(tmp_path: Path):
    s = summarize_run(_fake_run(tmp_path), budget=240)
    assert s["window_s"] == 4.0 and s["samples_per_s"] == 16 / 4 and s["tokens_per_s"] == 160 / 4
    assert s["engine_busy_frac"] == pytest.approx(2 / 3) and s["engine_running_mean"] == 6.0
    assert s["tokens_per_forward"] == 160 / 40 and s["ms_per_forward"] == pytest.approx(1000 * (2 / 3) * 4 / 40)
    assert s["trainer_idle_frac"] == 1 - 1.0 / 4 and s["staleness_mean"] == 0.5
    assert s["drift_per_version"] == pytest.approx(0.02)
    assert s["kl_tail"] == pytest.approx(0.8) and s["reward_tail"] == pytest.approx(0.2)  # the step at >= 180 tokens
    md = table({"a": "(a)", "c": "(c)"}, {"a": [{**s, "heldout_kl": 1.2}, {**s, "heldout_kl": 1.4}],
                                          "c": [{**s, "samples_per_s": 8.0, "heldout_kl": 1.3}]}, 240, 1.5)
    assert "| (c) | 1 | 8.0 | 2.00x |" in md and "held-out reverse KL, final (student 1.500)" in md
    assert "| drift per version |" in md and "| 0.50 | 0.0200 |" in md
    # the held-out column: mean ± 95% t-interval over the repeats (12.706 * sd / sqrt(2) for two)
    assert "| 1.300 ± 1.271 |" in md and md.rstrip().endswith("| 1.300 ± 0.000 |")


def test_summary_refuses_a_run_the_probe_did_not_see(tmp_path: Path):
    run = _fake_run(tmp_path)
    probe = json.loads((run / "probe.json").read_text())
    (run / "probe.json").write_text(json.dumps({**probe, "ticks": []}))
    with pytest.raises(RuntimeError, match="never reached a student engine"):
        summarize_run(run, budget=240)


@pytest.mark.slow
def test_quick_benchmark_runs_every_mode_and_reports_sane_numbers(tmp_path: Path):
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((out / "results.json").read_text())
    assert list(result["modes"]) == ["a", "b", "c", "d"]
    budget = result["setup"]["budget"]
    for slug, mode in result["modes"].items():
        (run,) = mode["runs"]
        for key in ("samples_per_s", "tokens_per_s", "engine_busy_frac", "trainer_idle_frac", "staleness_mean",
                    "kl_tail", "heldout_kl"):
            assert math.isfinite(run[key]), (slug, key, run[key])
        assert run["samples_per_s"] > 0 and 0 < run["engine_busy_frac"] <= 1 and 0 <= run["trainer_idle_frac"] <= 1
        assert run["staleness_mean"] >= 0 and run["steps"] >= 3
        tokens = [p[0] for p in run["curve"]]
        assert tokens == sorted(tokens) and tokens[-1] >= budget, "the run stopped before its sampled-token budget"
    assert result["modes"]["a"]["runs"][0]["staleness_mean"] == 0.0  # batch mode trains on-policy only
    md = (out / "results.md").read_text()
    assert all(f"| {m['name']} | 1 |" in md for m in result["modes"].values()) and "1.00x" in md
    assert result["verdict"]["fastest"] in ("c", "d") and result["verdict"]["speedup"] > 0
    assert 0 < result["heldout_reference"]["student"] < 10 and len(result["verdict"]["heldout_kl"]["diffs"]) == 1
    png = (out / "scheduler.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

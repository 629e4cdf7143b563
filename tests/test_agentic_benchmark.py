"""benchmarks/agentic: a --quick run of the real path (engine, Ray, Toolbox, sandboxes) writes a well-formed result.

No timing is asserted (benchmarks measure, tests check): only the shape of the result, the turn counts
the scenarios promise, and what the prefix cache must never change (tokens, routing, rewards).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "agentic" / "run.py"
MODE_KEYS = {"episodes", "episodes_per_s", "rollout_wall_s", "prewarm_s", "turns_per_episode",
             "prefill_tokens_per_episode", "cached_tokens_per_episode", "aborted", "tool_calls", "tool_call_p50_s",
             "tool_call_p99_s", "answer_steps", "answer_step_p50_s", "answer_step_p99_s", "share_generate",
             "share_tools", "share_other", "accuracy"}


@pytest.mark.slow
def test_quick_benchmark_writes_both_modes_of_each_scenario(tmp_path: Path):
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # the toy world is built here first (~1.5 min on 2 cores); --quick itself is the rest
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--toy-dir", str(tmp_path / "toy"), "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    report = json.loads(out.read_text())
    assert {"date", "machine", "args", "results"} <= set(report)
    results = {r["scenario"]: r for r in report["results"]}
    assert list(results) == ["dry_run", "keep_asking_4"]
    for name, r in results.items():
        on, off = r["cache_on"], r["cache_off"]
        for mode in (on, off):
            assert set(mode) == MODE_KEYS
            assert mode["episodes"] == 4
            assert all(math.isfinite(v) and v >= 0 for k, v in mode.items() if k != "share_other"), mode
            assert mode["share_generate"] + mode["share_tools"] + mode["share_other"] == pytest.approx(1.0)
            assert mode["tool_call_p50_s"] <= mode["tool_call_p99_s"]
            assert mode["tool_calls"] >= 1, "no episode reached the sandbox through the Toolbox"
        assert off["cached_tokens_per_episode"] == 0 and on["cached_tokens_per_episode"] > 0, name
        assert on["prefill_tokens_per_episode"] < off["prefill_tokens_per_episode"], name
        assert r["tokens_identical"] and r["routing_identical"] and r["rewards_identical"], name
        assert r["logprob_max_abs_diff"] < 1e-4, name
        assert r["prefill_ratio_off_on"] == pytest.approx(
            off["prefill_tokens_per_episode"] / on["prefill_tokens_per_episode"])
    assert results["keep_asking_4"]["cache_on"]["turns_per_episode"] == 4.0
    assert results["keep_asking_4"]["cache_off"]["turns_per_episode"] == 4.0
    assert "| keep_asking_4 | on |" in proc.stdout

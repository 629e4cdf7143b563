"""`mopd-train experiment=swe_smoke` through the real CLI: the built-in SWE tasks are the data, each
episode opens a local sandbox through the Toolbox, the grader's 0/1 reward is what GRPO trains on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs.swe.task import builtin_tasks

pytestmark = pytest.mark.slow


def _train(run_dir: Path, *overrides: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1")
    proc = subprocess.run([sys.executable, "-m", "mopd.train", "experiment=swe_smoke", f"run_dir={run_dir}",
                           "logger.progress=false", *overrides],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _samples(run_dir: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples" / f"step_{step}.jsonl").read_text().splitlines()]


def test_swe_smoke_trains_two_steps_on_graded_episodes(tmp_path: Path):
    run_dir = tmp_path / "run"
    _train(run_dir, "num_steps=2")

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        # 3 built-in tasks x 2 samples, every one an episode of 2 model turns, none aborted; each made
        # 2 env steps: with env.max_turns=2 the second ends the episode (SWEEnv submits it for grading)
        assert (m["agent/episodes"], m["agent/turns"], m["agent/aborted"]) == (6, 2, 0), m
        assert m["agent/tool_calls"] == 12 and m["agent/tool_latency_p50_s"] > 0, m
        assert 0 <= m["rollout/reward/swe"] <= 1 and isinstance(m.get("train/loss"), (int, float)), m

    statements = {t.problem_statement[:60] for t in builtin_tasks()}  # ASCII: the toy tokenizer keeps it
    for step in (0, 1):
        samples = _samples(run_dir, step)
        assert len(samples) == 6 and {s["domain"] for s in samples} == {"swe"}
        # every task's prompt is the env's first observation, rendered with the chat template
        assert {p for s in samples for p in statements if p in s["prompt"]} == statements
        for s in samples:
            assert "Repository " in s["prompt"] and "You have 2 turns." in s["prompt"]
            assert s["reward"] in (0.0, 1.0) and s["finish_reason"] != "abort", s
            assert "<|im_start|>user\n<tool_response>\n" in s["response"]  # turn 1: the env's observation

    # resume: the task stream goes on where the checkpoint left it (3 tasks a step, positions 0..8)
    _train(run_dir, "num_steps=3", "resume=true")
    positions = [sorted({s["prompt_index"] for s in _samples(run_dir, step)}) for step in range(3)]
    assert positions == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]

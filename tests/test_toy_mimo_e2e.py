"""`mopd-train experiment=dry_run student=toy_mimo`: MOPD on a tiny MiMo-V2-Flash with R3, MTP speculative
rollout and the MTP loss, on CPU, through the real CLI (a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_dry_run_with_toy_mimo(tmp_path: Path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1",
               WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-m", "mopd.train", "experiment=dry_run", "student=toy_mimo",
                           "toy.teacher_steps=40", "toy.base_steps=40", "logger.progress=false", "num_steps=3",
                           "save_interval=10", "rollout.prompts_per_step=4", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    config = (run_dir / "config.yaml").read_text()
    assert "speculative_num_steps: 3" in config and "arch: mimo_v2_flash" in config
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert isinstance(m.get("train/loss"), (int, float)) and isinstance(m.get("train/mtp_loss"), (int, float))
    # tokens per verify forward of the speculative engines. A step whose responses are all a lone end of turn
    # (dry_run's lr can push the tiny student there for a step, seen in CI) makes no verify forward and so has
    # no accept length, as SGLang reports none; step 0, before any update, always has one.
    accept = {m["step"]: m["rollout/spec_accept_len"] for m in metrics if "rollout/spec_accept_len" in m}
    assert 0 in accept and all(a >= 1.0 for a in accept.values()), accept
    for m in metrics:
        if m["step"] not in accept:
            rows = (run_dir / "samples" / f"step_{m['step']}.jsonl").read_text().splitlines()
            assert all(json.loads(r)["response_tokens"] <= 1 for r in rows), f"step {m['step']}: no accept length"

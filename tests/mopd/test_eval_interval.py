"""`eval_interval`: held-out accuracy per domain logged during training, and its start-up checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mopd.core.errors import ConfigError
from mopd.evaluate import flat_metrics
from mopd.train import check_command_line, eval_due


def _check(*overrides: str, run_dir: str = "/tmp/mopd-eval-interval-test"):
    return check_command_line([f"run_dir={run_dir}", "experiment=dry_run", *overrides])


@pytest.mark.parametrize("override, field", [
    ("eval_interval=-1", "eval_interval"),
    ("eval.per_domain=0", "eval.per_domain"),
    ("eval.samples=-2", "eval.samples"),
    ("eval.temperature=0", "eval.temperature"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("eval.files=['']", "eval.files"),
    ("+eval.typo=1", "eval.typo"),
])
def test_bad_eval_settings_are_refused_at_start_up(override: str, field: str):
    with pytest.raises(ConfigError) as err:
        _check("eval_interval=2", override)
    assert err.value.field_name == field


def test_eval_interval_needs_held_out_prompts(tmp_path: Path):
    with pytest.raises(ConfigError) as err:  # no toy world and no eval.files: nothing to evaluate on
        _check("eval_interval=2", "toy.dir=null", f"student.model_path={tmp_path}")
    assert err.value.field_name in ("eval.files", "student.model_path")
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError) as err:
        _check("eval_interval=2", f"eval.files=[{missing}]")
    assert err.value.field_name == "eval.files[0]"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')  # no domain column
    with pytest.raises(ConfigError) as err:
        _check("eval_interval=2", f"eval.files=[{bad}]")
    assert err.value.field_name == "eval.files[0]"


def test_off_by_default_and_due_every_n_steps_and_at_the_end():
    job = _check()
    assert job.eval_interval == 0 and not any(eval_due(job, s) for s in range(30))
    job = _check("eval_interval=3", "num_steps=7")
    assert [s for s in range(7) if eval_due(job, s)] == [2, 5, 6]


def test_flat_metrics_name_domain_and_kind_and_average_over_domains():
    flat = flat_metrics({"a": {"greedy": 1.0, "sampled": 0.5, "prompts": 4}, "b": {"greedy": 0.0, "sampled": 0.25,
                                                                                 "prompts": 4}})
    assert flat == {"eval/a/greedy": 1.0, "eval/a/sampled": 0.5, "eval/b/greedy": 0.0, "eval/b/sampled": 0.25,
                    "eval/mean/greedy": 0.5, "eval/mean/sampled": 0.375}


@pytest.mark.slow
def test_a_run_logs_held_out_accuracy_per_domain_to_metrics_and_wandb(tmp_path: Path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1",
               WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-m", "mopd.train", "experiment=dry_run", f"run_dir={run_dir}",
                           "toy.teacher_steps=20", "logger.progress=false", "num_steps=4", "save_interval=0",
                           "eval_interval=2", "eval.per_domain=6", "eval.samples=2", "dump_samples=false"],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    evaluated = [m for m in metrics if "eval/arith/greedy" in m]
    assert [m["step"] for m in evaluated] == [1, 3]
    for m in evaluated:
        for key in ("eval/arith/greedy", "eval/reverse/greedy", "eval/arith/sampled", "eval/reverse/sampled",
                    "eval/mean/greedy", "eval/arith/pass@2"):
            assert 0.0 <= m[key] <= 1.0, (key, m)
        assert m["eval/sampled_tokens"] > 0 and m["time/eval_s"] > 0
    assert evaluated[1]["eval/sampled_tokens"] > evaluated[0]["eval/sampled_tokens"]
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_files and b"eval/arith/greedy" in wandb_files[0].read_bytes()

"""A shortened dry run through the real CLI: Ray, local engines, teachers, Megatron trainer, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SHORT = ["experiment=dry_run", "toy.teacher_steps=60", "logger.progress=false", "save_interval=10"]


def _train(*overrides: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1")
    return subprocess.run([sys.executable, "-m", "mopd.train", *overrides], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd, check=False)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dry") / "run"
    cwd = run_dir.parent / "cwd"
    cwd.mkdir()
    proc = _train(*SHORT, f"run_dir={run_dir}", "num_steps=20", cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert list(cwd.iterdir()) == [], "the run wrote outside run_dir (Hydra's outputs/DATE/TIME?)"
    return run_dir


def test_run_writes_config_metrics_checkpoints_and_wandb(run_dir: Path):
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "mopd-train.log").is_file() and not (run_dir / ".hydra").exists()
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(20))
    for m in metrics:
        for key in ("train/loss", "mopd/reverse_kl/arith", "mopd/reverse_kl/reverse", "rollout/tokens",
                    "time/step_s"):
            assert isinstance(m.get(key), (int, float)), (key, m)
        assert m["rollout/tokens"] > 0
    assert (run_dir / "checkpoints" / "step_10" / "driver.json").is_file()
    assert (run_dir / "checkpoints" / "step_20" / "driver.json").is_file()


def test_reverse_kl_to_every_teacher_falls(run_dir: Path):
    metrics = _metrics(run_dir)
    for teacher in ("arith", "reverse"):
        kl = [m[f"mopd/reverse_kl/{teacher}"] for m in metrics]
        first = sum(kl[:5]) / 5
        lowest = min(sum(kl[i:i + 5]) / 5 for i in range(5, len(kl) - 4))
        # measured falls of the last 5 steps (7 runs, both teachers): 0.9-2.4 nats; step-to-step noise ~0.3. One
        # run jumped back up at step 12 (arith 3.8 -> 5.1 nats, the entropy with it) and its last-5 mean fell
        # only 0.26, its lowest 5-step window 0.54: the lowest window is the robust reading of "it learns"
        assert lowest < first - 0.3, (teacher, kl)
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run directory"


def test_checkpoint_exports_a_student_that_transformers_loads(run_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = run_dir / "checkpoints" / "step_20" / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = tokenizer("1+2=", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] >= len(tokenizer)


def test_resume_continues_steps_without_skipping_or_repeating_prompts(run_dir: Path):
    proc = _train(*SHORT, f"run_dir={run_dir}", "num_steps=22", "resume=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert [m["step"] for m in _metrics(run_dir)] == list(range(22))
    positions = []
    for step in range(22):
        rows = [json.loads(line) for line in (run_dir / "samples" / f"step_{step}.jsonl").read_text().splitlines()]
        positions += sorted({r["prompt_index"] for r in rows})
    # 22 steps x 32 prompts, two equally weighted domains: positions 0..703, each exactly once
    assert sorted(positions) == list(range(22 * 32))
    assert _metrics(run_dir)[-1]["rollout/weight_version"] == 22


@pytest.mark.parametrize("override, field", [
    ("trainer.eps_low=3.0", "trainer.eps_low"),
    ("teachers.arith.model_path=/nowhere", "teachers.arith.model_path"),
    ("default_teacher=chemistry", "default_teacher"),
    ("rollout.max_context_len=2048", "rollout.max_context_len"),  # the toy student has 1024 positions
    ("toy.domains=[arith]", "data.domain_weights"),  # refused before the world is rebuilt for one domain
])
def test_config_errors_fail_before_start_up_and_name_the_field(run_dir: Path, override: str, field: str,
                                                               tmp_path: Path):
    bad = tmp_path / "bad"
    proc = _train(*SHORT, f"run_dir={bad}", f"toy.dir={run_dir / 'toy'}", override, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"invalid config `{field}`" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no outputs/ in the working directory
    assert [p.name for p in bad.iterdir()] == ["mopd-train.log"]  # nothing but the log


def test_data_domain_without_a_teacher_is_a_start_up_error(run_dir: Path, tmp_path: Path):
    data = tmp_path / "chem.jsonl"
    data.write_text(json.dumps({"prompt": "H2O?", "domain": "chemistry", "label": "water"}) + "\n")
    toy_train = run_dir / "toy" / "data" / "train.jsonl"
    proc = _train(*SHORT, f"run_dir={tmp_path / 'run'}", f"toy.dir={run_dir / 'toy'}",
                  f"data.train_files=[{toy_train},{data}]", "+data.domain_weights.chemistry=1.0", timeout=120)
    assert proc.returncode == 2
    assert "no teacher covers ['chemistry']" in proc.stderr + proc.stdout

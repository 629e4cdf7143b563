"""A corpus of bad configs: each exits 2 at start-up naming the field, with nothing started or written.

One line per case: the command-line overrides, the data file's content (or None), the field the
error must name. `{data}` in an override is the data file's path, `{tmp}` the test's directory.
Every case runs in-process through `check_command_line` (the checks `mopd-train` and
`mopd-train --cfg job` run first); a representative subset runs the real `mopd-train` CLI in a
subprocess and asserts exit 2, the field on stderr, no Ray session, nothing in run_dir but the
log, no outputs/ in the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mopd.core.errors import ConfigError
from mopd.train import check_command_line

ROWS = "".join(json.dumps(r) + "\n" for r in (
    {"prompt": "1+1=", "domain": "arith", "label": "2"},
    {"prompt": [{"role": "user", "content": "abc"}], "domain": "reverse", "label": "cba"},
))
BAD_TEACHER_YAML = {  # --config-dir teacher files: a typo'd key, a negative count, a wrong type
    "typo": "model_path: /m\ndomains: [chemistry]\nengine: 2\n",
    "negative": "model_path: /m\ndomains: [chemistry]\nnum_engines: -1\n",
    "wrong_type": "model_path: /m\ndomains: chemistry\nnum_engines: 1\n",
}
CUDA = torch.cuda.is_available()

# (overrides, data file content or None, field the error names)
CASES: list[tuple[str, str | None, str]] = [
    # wrong types
    ("rollout.num_engines=many", None, "rollout.num_engines"),
    ("num_steps=1.5", None, "num_steps"),
    ("resume=maybe", None, "resume"),
    ("trainer.lr=fast", None, "trainer.lr"),
    ("data.domain_weights.arith=heavy", None, "data.domain_weights.arith"),
    ("teachers.arith.num_engines=two", None, "teachers.arith.num_engines"),
    ("teachers.arith.domains=arith", None, "teachers.arith.domains"),
    ("+teacher@teachers.chem=wrong_type", None, "teachers.chem.domains"),
    # unknown keys, with and without +
    ("+rollout.not_a_field=1", None, "rollout.not_a_field"),
    ("+not_a_top_level_field=1", None, "not_a_top_level_field"),
    ("+teachers.arith.temperature=0.5", None, "teachers.arith.temperature"),
    ("+trainer.optimizer.name=adam", None, "trainer.optimizer"),
    ("+env.sandbox.gpus=1", None, "env.sandbox.gpus"),
    ("rollout.not_a_field=1", None, "rollout.not_a_field"),
    ("+teacher@teachers.chem=typo", None, "teachers.chem.engine"),
    # NaN and inf
    ("trainer.eps_high=nan", None, "trainer.eps_high"),
    ("trainer.lr=inf", None, "trainer.lr"),
    ("algo.alpha=nan", None, "algo.alpha"),
    ("algo.teacher_reward_clip=inf", None, "algo.teacher_reward_clip"),
    ("rollout.temperature=-inf", None, "rollout.temperature"),
    ("rollout.top_p=nan", None, "rollout.top_p"),
    ("data.domain_weights.arith=nan", None, "data.domain_weights.arith"),
    ("teachers.arith.cpus_per_engine=inf", None, "teachers.arith.cpus_per_engine"),
    ("env.sandbox.wall_timeout_s=nan", None, "env.sandbox.wall_timeout_s"),
    ("toy.teacher_lr=nan", None, "toy.teacher_lr"),
    # negative counts and sizes
    ("rollout.cpus_per_engine=-1", None, "rollout.cpus_per_engine"),
    ("ray_num_cpus=-4", None, "ray_num_cpus"),
    ("rollout.max_retries=-1", None, "rollout.max_retries"),
    ("rollout.gpus_per_engine=-1", None, "rollout.gpus_per_engine"),
    ("trainer.warmup_steps=-5", None, "trainer.warmup_steps"),
    ("seed=-1", None, "seed"),
    ("env.sandbox.warm_pool_size=-1", None, "env.sandbox.warm_pool_size"),
    ("teachers.arith.num_engines=0", None, "teachers.arith.num_engines"),
    ("+teacher@teachers.chem=negative", None, "teachers.chem.num_engines"),
    ("save_interval=-1", None, "save_interval"),
    ("toy.teacher_steps=0", None, "toy.teacher_steps"),
    # zero timeouts
    ("rollout.request_timeout_s=0", None, "rollout.request_timeout_s"),
    ("rollout.startup_timeout_s=0", None, "rollout.startup_timeout_s"),
    ("trainer.weight_sync_timeout_s=0", None, "trainer.weight_sync_timeout_s"),
    ("env.sandbox.wall_timeout_s=0", None, "env.sandbox.wall_timeout_s"),
    # other ranges
    ("rollout.top_k=0", None, "rollout.top_k"),
    ("rollout.mem_fraction_static=1.5", None, "rollout.mem_fraction_static"),
    ("trainer.adam_beta2=1.0", None, "trainer.adam_beta2"),
    ("trainer.min_lr=1.0", None, "trainer.min_lr"),
    ("toy.hidden_size=12", None, "toy.hidden_size"),
    ("toy.arch=llama", None, "toy.arch"),
    ("algo.grpo_eps=0", None, "algo.grpo_eps"),
    ("env.sandbox.agent_port=70000", None, "env.sandbox.agent_port"),
    ("rollout.backend=remote rollout.urls=[localhost:30000]", None, "rollout.urls"),
    ("logger.wandb_mode=sometimes", None, "logger.wandb_mode"),
    ("trainer.loss=ppo", None, "trainer.loss"),
    ("default_teacher=chemistry", None, "default_teacher"),
    # invalid parallel sizes
    ("trainer.tp_size=0", None, "trainer.tp_size"),
    ("trainer.ep_size=4", None, "trainer.ep_size"),
    ("trainer.pp_size=0", None, "trainer.pp_size"),
    # the machine: NCCL weight sync, CUDA, CPUs
    ("trainer.weight_sync=distributed", None, "trainer.weight_sync"),
    ("rollout=sglang trainer.weight_sync_engine_tp=1", None, "trainer.weight_sync_engine_tp"),  # engines TP 2
    ("trainer.weight_sync_engine_tp=-1", None, "trainer.weight_sync_engine_tp"),
    ("ray_num_cpus=1", None, "ray_num_cpus"),
    # toy world: checked before it is built
    ("toy.domains=[arith,chemistry]", None, "toy.domains"),
    ("toy.domains=[arith]", None, "data.domain_weights"),
    ("toy.domains=[arith,reverse,sort]", None, "data.domain_weights"),
    ("toy.domains=[]", None, "toy.domains"),
    # data files
    ("data.train_files=[{data}]", "[1, 2]\n", "data.train_files"),
    ("data.train_files=[{data}]", "5\n", "data.train_files"),
    ("data.train_files=[{data}]", '"a string row"\n', "data.train_files"),
    ("data.train_files=[{data}]", ROWS + '{"domain": "arith", "label": "2"}\n', "data.prompt_key"),
    ("data.train_files=[{data}]", ROWS + '{"prompt": "1+2=", "domain": "arith"\n', "data.train_files"),
    ("data.train_files=[{data}]", ROWS + '{"prompt": 7, "domain": "arith"}\n', "data.train_files"),
    ("data.train_files=[{data}]", ROWS + '{"prompt": "x", "domain": ["arith"]}\n', "data.train_files"),
    ("data.train_files=[{data}]", "", "data.train_files"),
    ("data.train_files=[{tmp}/missing.jsonl]", None, "data.train_files"),
    ("data.train_files=[{data}]", ROWS + '{"prompt": "H2O?", "domain": "chemistry"}\n', "data.domain_weights"),
    ("data.train_files=[{data}] +data.domain_weights.chemistry=1",
     ROWS + '{"prompt": "H2O?", "domain": "chemistry"}\n', "teachers"),
    # teachers and checkpoints
    ("+teacher@teachers.chem=not_a_teacher_file", None, "teacher"),
    ("+teacher@teachers.chem=sglang_example", None, "teachers.chem.model_path"),
    ("teachers.arith.model_path=/nowhere", None, "teachers.arith.model_path"),
    ("teachers.arith.domains=[]", None, "teachers.arith.domains"),
    ("teachers.reverse.domains=[arith]", None, "teachers.reverse.domains"),
    ("student.model_path=/nowhere", None, "student.model_path"),
    ("student.model_path={student} rollout.max_context_len=2048", None, "rollout.max_context_len"),
    ("student.model_path={tmp}", None, "student.model_path"),
    ("teachers.arith.backend=remote teachers.arith.urls=[arith-teacher:30000]", None, "teachers.arith.urls"),
    ("teachers.arith.backend=remote", None, "teachers.arith.urls"),
    ("teachers.arith.domains=[arith,'']", None, "teachers.arith.domains"),
    ("teachers.arith.request_timeout_s=0", None, "teachers.arith.request_timeout_s"),
    ("teachers.arith.max_context_len=64", None, "teachers.arith.max_context_len"),  # rollout's is 128
    ("teachers.arith.coef=-1", None, "teachers.arith.coef"),
    ("rollout=not_a_rollout_config", None, "rollout"),
]
if not CUDA:
    CASES += [
        ("trainer.weight_sync=distributed trainer.device=auto", None, "trainer.weight_sync"),
        ("trainer.device=cuda", None, "trainer.device"),
        ("rollout.gpus_per_engine=1", None, "rollout.gpus_per_engine"),
        ("teachers.arith.gpus_per_engine=1", None, "teachers.arith.gpus_per_engine"),
    ]

# run through the real CLI too: one per kind (type, unknown key, NaN, parallel size, data row, toy, teacher file)
SUBPROCESS = ["rollout.num_engines=many", "+rollout.not_a_field=1", "trainer.eps_high=nan", "trainer.tp_size=0",
              "toy.domains=[arith]", "+teacher@teachers.chem=typo"]
SUBPROCESS_DATA = ("data.train_files=[{data}]", "[1, 2]\n")


def _overrides(case: str, tmp: Path, data: str | None, student: Path | None = None) -> list[str]:
    data_file = tmp / "data.jsonl"
    if data is not None:
        data_file.write_text(data)
    return ["experiment=dry_run", f"run_dir={tmp / 'run'}",
            *(o.format(data=data_file, tmp=tmp, student=student) for o in case.split())]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A real (tiny) HF checkpoint outside the toy world, so checks of an existing student run."""
    from mopd.toy.models import create_tiny_model
    from mopd.toy.tokenizer import build_char_tokenizer

    return create_tiny_model(tmp_path_factory.mktemp("student") / "hf", build_char_tokenizer(), arch="qwen3",
                             hidden_size=16, num_layers=1)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """An extra config directory (--config-dir) holding bad teacher files."""
    root = tmp_path_factory.mktemp("configs")
    (root / "teacher").mkdir()
    for name, text in BAD_TEACHER_YAML.items():
        (root / "teacher" / f"{name}.yaml").write_text(text)
    return root


def test_corpus_is_large_and_distinct():
    keys = [(o, d) for o, d, _ in CASES]
    assert len(CASES) >= 20 and len(set(keys)) == len(keys)


@pytest.mark.parametrize("overrides, data, field", CASES, ids=[c[0] if c[1] is None else f"{c[0]}|{c[1][-30:]!r}"
                                                             for c in CASES])
def test_bad_config_is_refused_naming_the_field(overrides, data, field, tmp_path, config_dir, student, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_command_line(_overrides(overrides, tmp_path, data, student), config_dir=str(config_dir))
    assert err.value.field_name == field, str(err.value)
    assert f"invalid config `{field}`: expected" in str(err.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_a_valid_config_passes_the_same_checks(tmp_path, student, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = check_command_line(_overrides("+teacher@teachers.sort=toy_sort toy.domains=[arith,reverse,sort] "
                                        "+data.domain_weights.sort=1", tmp_path, None))
    assert set(job.teachers) == {"arith", "reverse", "sort"}
    data = tmp_path / "data.jsonl"
    job = check_command_line(_overrides("data.train_files=[{data}]", tmp_path, ROWS))
    assert job.data.train_files == [str(data)]
    job = check_command_line(_overrides("student.model_path={student}", tmp_path, None, student))
    assert job.student.model_path == str(student)
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def _cli(args: list[str], cwd: Path, config_dir: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("mopd-train", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mopd.train"]
    if config_dir is not None:
        cmd += ["--config-dir", str(config_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", RAY_TMPDIR=str(cwd / "ray"))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=120, env=env, check=False)


def _assert_refused_before_start(proc: subprocess.CompletedProcess, field: str, tmp: Path, elapsed: float) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"invalid config `{field}`: expected" in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp / "ray").exists(), "a Ray session was started"
    run = tmp / "run"
    assert not run.exists() or {p.name for p in run.iterdir()} <= {"mopd-train.log"}, list(run.iterdir())
    assert not (tmp / "outputs").exists(), "Hydra wrote outputs/ in the working directory"
    assert elapsed < 90


@pytest.mark.parametrize("overrides", SUBPROCESS)
def test_cli_exits_2_before_starting_anything(overrides, tmp_path, config_dir):
    field = next(f for o, d, f in CASES if o == overrides and d is None)
    start = time.monotonic()
    proc = _cli(_overrides(overrides, tmp_path, None), tmp_path, config_dir)
    _assert_refused_before_start(proc, field, tmp_path, time.monotonic() - start)


def test_cli_refuses_a_data_row_that_is_not_an_object(tmp_path):
    start = time.monotonic()
    proc = _cli(_overrides(SUBPROCESS_DATA[0], tmp_path, SUBPROCESS_DATA[1]), tmp_path)
    _assert_refused_before_start(proc, "data.train_files", tmp_path, time.monotonic() - start)
    assert "data.jsonl:1" in proc.stderr


def test_cli_cfg_job_validates(tmp_path):
    """`--cfg job` prints a valid config (exit 0) and refuses an invalid one (exit 2); it writes nothing."""
    bad = _cli(_overrides("rollout.top_k=0", tmp_path, None) + ["--cfg", "job"], tmp_path)
    assert bad.returncode == 2 and "invalid config `rollout.top_k`" in bad.stderr, bad.stderr[-3000:]
    good = _cli(_overrides("", tmp_path, None) + ["--cfg", "job"], tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    assert f"run_dir: {tmp_path / 'run'}" in good.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_mopd_toy_refuses_unknown_domains_before_writing(tmp_path, capsys):
    from mopd.toy.cli import main as toy_main

    with pytest.raises(SystemExit) as exit_:
        toy_main(["init", str(tmp_path / "world"), "--domains", "arith,chemistry"])
    assert exit_.value.code == 2 and "chemistry" in capsys.readouterr().err
    assert not (tmp_path / "world").exists()

"""The data scheduler: quotas per domain and exact resume (no prompt skipped or repeated)."""

import asyncio
import json
import os
import shutil
import tempfile

import pytest

from envs.config import EnvConfig, SandboxConfig
from envs.registry import load_task
from envs.sandbox.local import LocalSandboxBackend
from envs.swe.env import SWEEnv
from envs.swe.task import builtin_tasks, task_to_dict
from envs.toy_tasks import make_examples
from mopd.config import DataConfig
from mopd.core.errors import ConfigError
from mopd.data import DataScheduler, env_task_rows, load_prompts, scan_domains
from mopd.toy.tokenizer import build_char_tokenizer
from mopd.train import check_command_line


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_resume_continues_the_stream_exactly(tmp_path, tokenizer):
    cfg = DataConfig(train_files=[_write(tmp_path / "d.jsonl", make_examples("arith", 10, 0)
                                         + make_examples("reverse", 10, 0))])
    rows = load_prompts(cfg, tokenizer, max_prompt_len=100)
    straight = DataScheduler(rows, cfg)
    seen = [p for _ in range(7) for p, _ in straight.next_prompts(4)]  # crosses an epoch boundary
    first = DataScheduler(rows, cfg)
    part = [p for _ in range(3) for p, _ in first.next_prompts(4)]
    resumed = DataScheduler(rows, cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    part += [p for _ in range(4) for p, _ in resumed.next_prompts(4)]
    assert part == seen
    # within one epoch every prompt comes exactly once
    sched = DataScheduler(rows, cfg)
    rows_epoch = [r for _, r in sched.next_prompts(20)]
    assert sorted(map(id, rows_epoch)) == sorted(map(id, rows))


def test_domain_weights_give_each_domain_its_quota(tmp_path, tokenizer):
    cfg = DataConfig(train_files=[_write(tmp_path / "d.jsonl", make_examples("arith", 10, 0)
                                         + make_examples("reverse", 10, 0))],
                     domain_weights={"arith": 1.0, "reverse": 3.0})
    sched = DataScheduler(load_prompts(cfg, tokenizer, 100), cfg)
    for _ in range(5):
        domains = [r.domain for _, r in sched.next_prompts(8)]
        assert domains.count("arith") == 2 and domains.count("reverse") == 6
    samples = sched.make_samples(2, 3)
    assert len(samples) == 6 and len({s.group_index for s in samples}) == 2


def test_bad_data_fails_with_the_field_named(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="data.train_files"):
        load_prompts(DataConfig(train_files=[str(tmp_path / "missing.jsonl")]), tokenizer, 100)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "domain": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        load_prompts(DataConfig(train_files=[str(bad)]), tokenizer, 100)
    nodomain = _write(tmp_path / "nd.jsonl", [{"prompt": "x"}])
    with pytest.raises(ConfigError, match="data.domain_key"):
        load_prompts(DataConfig(train_files=[nodomain]), tokenizer, 100)
    ok = _write(tmp_path / "ok.jsonl", make_examples("arith", 3, 0))
    with pytest.raises(ConfigError, match="data.domain_weights"):
        cfg = DataConfig(train_files=[ok], domain_weights={"chem": 1.0})
        DataScheduler(load_prompts(cfg, tokenizer, 100), cfg)
    with pytest.raises(ConfigError, match="missing \\['arith'\\]"):
        both = _write(tmp_path / "both.jsonl", make_examples("arith", 3, 0) + make_examples("reverse", 3, 0))
        cfg = DataConfig(train_files=[both], domain_weights={"reverse": 1.0})
        DataScheduler(load_prompts(cfg, tokenizer, 100), cfg)


def test_overlong_prompts_are_dropped_not_truncated(tmp_path, tokenizer):
    rows = [{"prompt": "1+1=", "domain": "arith", "label": "2"}, {"prompt": "x" * 300, "domain": "arith"}]
    cfg = DataConfig(train_files=[_write(tmp_path / "d.jsonl", rows)])
    loaded = load_prompts(cfg, tokenizer, max_prompt_len=64)
    assert len(loaded) == 1 and loaded[0].label == "2"


@pytest.mark.parametrize("line, field, says", [
    ("[1, 2]", "data.train_files", "a JSON object on every line"),
    ("5", "data.train_files", "holds a int"),
    ("null", "data.train_files", "holds a NoneType"),
    ('{"domain": "arith"}', "data.prompt_key", "a key present in every row"),
    ('{"prompt": ["x"], "domain": "arith"}', "data.train_files", "chat messages"),
    ('{"prompt": "x", "domain": 3}', "data.train_files", "non-empty string domain"),
])
def test_rows_that_are_not_prompt_objects_name_the_file_and_line(tmp_path, tokenizer, line, field, says):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "domain": "arith"}) + "\n\n" + line + "\n")
    for check in (lambda: load_prompts(DataConfig(train_files=[str(path)]), tokenizer, 100),
                  lambda: scan_domains(DataConfig(train_files=[str(path)]), str(path))):
        with pytest.raises(ConfigError) as err:
            check()
        assert err.value.field_name == field and says in str(err.value) and "rows.jsonl:3" in str(err.value)


def test_scan_domains_reads_every_row_without_a_tokenizer(tmp_path):
    path = _write(tmp_path / "d.jsonl", make_examples("arith", 3, 0) + make_examples("reverse", 2, 0))
    assert scan_domains(DataConfig(train_files=[path]), path) == {"arith", "reverse"}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="at least one row"):
        scan_domains(DataConfig(train_files=[str(empty)]), str(empty))


def test_each_swe_task_becomes_a_row_of_the_episode_domain():
    env, cfg = EnvConfig(kind="swe", max_turns=3), DataConfig()
    rows = env_task_rows(env, cfg)
    tasks = builtin_tasks()
    assert len(rows) == len(tasks) >= 3
    for row, task in zip(rows, tasks, strict=True):
        assert row["domain"] == "swe" and row["task"] == task_to_dict(task)
        assert load_task("swe", json.loads(json.dumps(row["task"]))) == task  # the form episodes open on
        [message] = row["prompt"]
        assert message["role"] == "user" and task.problem_statement in message["content"]
    assert env_task_rows(EnvConfig(kind="swe", max_turns=3, domains=["code"]), cfg)[0]["domain"] == "code"
    assert env_task_rows(EnvConfig(), cfg) == [] and env_task_rows(EnvConfig(kind="toy_tool", max_turns=2), cfg) == []


def test_a_task_rows_prompt_is_what_the_envs_reset_answers():
    """The episode renders its prompt from reset's observation; the row the length filter sees must match."""
    base = tempfile.mkdtemp(prefix="mopd-sbtest-", dir="/tmp")
    os.chmod(base, 0o711)  # the sandbox uid must enter it
    backend = LocalSandboxBackend(SandboxConfig(wall_timeout_s=30, memory_mb=768, base_dir=base))
    env_cfg = EnvConfig(kind="swe", max_turns=5)
    row, task = env_task_rows(env_cfg, DataConfig())[0], builtin_tasks()[0]

    async def reset() -> str:
        env = SWEEnv(backend.create, max_turns=env_cfg.max_turns)
        try:
            return await env.reset(task)
        finally:
            await env.close()

    try:
        assert row["prompt"][0]["content"] == asyncio.run(reset())
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_task_rows_join_the_jsonl_rows_and_resume_exactly(tmp_path, tokenizer):
    cfg = DataConfig(train_files=[_write(tmp_path / "d.jsonl", make_examples("arith", 5, 0))],
                     domain_weights={"arith": 1.0, "swe": 1.0})
    task_rows = env_task_rows(EnvConfig(kind="swe", max_turns=3), cfg)
    rows = load_prompts(cfg, tokenizer, 1000, task_rows)
    assert [r.domain for r in rows] == ["arith"] * 5 + ["swe"] * len(task_rows)
    swe = [r for r in rows if r.domain == "swe"]
    assert [r.metadata["task"] for r in swe] == [t["task"] for t in task_rows] and swe[0].label is None
    straight = DataScheduler(rows, cfg)
    seen = [(p, r.domain) for _ in range(5) for p, r in straight.next_prompts(4)]
    first = DataScheduler(rows, cfg)
    part = [(p, r.domain) for _ in range(2) for p, r in first.next_prompts(4)]
    resumed = DataScheduler(load_prompts(cfg, tokenizer, 1000, env_task_rows(EnvConfig(kind="swe", max_turns=3), cfg)),
                            cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    part += [(p, r.domain) for _ in range(3) for p, r in resumed.next_prompts(4)]
    assert part == seen and [d for _, d in seen].count("swe") == 10
    # a prompt longer than the limit is dropped, as a JSONL row's would be; none left names the field
    with pytest.raises(ConfigError, match="data.train_files"):
        load_prompts(DataConfig(), tokenizer, 50, task_rows)


def test_swe_tasks_need_no_train_files_and_bad_ones_fail_naming_the_field(tmp_path):
    job = check_command_line(["experiment=swe_smoke", f"run_dir={tmp_path}/run"])
    assert job.data.train_files == [] and job.env.kind == "swe" and not job.uses_teachers
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "task.json").write_text('{"instance_id": "x"}')
    for tasks, field, says in ((f"[{tmp_path}/missing]", "env.tasks[0]", "an existing task directory"),
                               (f"[{tmp_path}/broken]", "env.tasks[0]", "missing field `repo`")):
        with pytest.raises(ConfigError) as err:
            check_command_line(["experiment=swe_smoke", f"run_dir={tmp_path}/run", f"env.tasks={tasks}"])
        assert err.value.field_name == field and says in str(err.value)
    with pytest.raises(ConfigError) as err:  # several episode domains: which one would the tasks be?
        check_command_line(["experiment=swe_smoke", f"run_dir={tmp_path}/run", "env.domains=[swe,code]"])
    assert err.value.field_name == "env.domains"
    with pytest.raises(ConfigError) as err:  # no data at all
        check_command_line(["experiment=swe_smoke", f"run_dir={tmp_path}/run", "env=verifiable"])
    assert err.value.field_name == "data.train_files" and "env.kind has tasks" in str(err.value)

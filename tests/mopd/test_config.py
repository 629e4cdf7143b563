"""Hydra composition of the real configs and start-up validation errors."""

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from mopd.config import register_configs, to_job_config
from mopd.core.errors import ConfigError
from mopd.train import check_command_line

register_configs()


def _compose(*overrides: str):
    with initialize_config_module(config_module="configs", version_base=None):
        return compose(config_name="config", overrides=["run_dir=/tmp/mopd-config-test", *overrides])


def test_dry_run_experiment_composes_typed():
    job = to_job_config(_compose("experiment=dry_run"))
    assert set(job.teachers) == {"arith", "reverse"}
    assert job.teachers["arith"].domains == ["arith"]
    assert job.student.model_path == "/tmp/mopd-config-test/toy/student"
    assert job.trainer.loss == "mopd"


def test_register_a_teacher_on_the_command_line():
    job = to_job_config(_compose("experiment=dry_run", "+teacher@teachers.sort=toy_sort"))
    assert job.teachers["sort"].domains == ["sort"]
    assert job.teachers["sort"].model_path.endswith("toy/teacher_sort")


@pytest.mark.parametrize("override, field", [
    ("env.max_new_tokens=4096", "env.max_new_tokens"),  # a turn longer than the whole context
    ("env.max_turns=1", "env.max_turns"),
    ("rollout.sample_from=teacher", "rollout.sample_from"),
    ("env.domains=[chemistry]", None),  # checked against the data at start-up (preflight), not here
])
def test_invalid_agentic_values_name_the_field(override, field):
    cfg = _compose("experiment=agentic_dry_run", override)
    if field is None:
        to_job_config(cfg)
        return
    with pytest.raises(ConfigError) as err:
        to_job_config(cfg)
    assert err.value.field_name == field


@pytest.mark.parametrize("override, field", [
    ("trainer.eps_low=3.0", "trainer.eps_low"),
    ("trainer.eps_high=0.5", "trainer.eps_high"),
    ("trainer.loss=ppo", "trainer.loss"),
    ("default_teacher=chemistry", "default_teacher"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.max_new_tokens=4096", "rollout.max_new_tokens"),
    ("teachers.arith.backend=vllm", "teachers.arith.backend"),
    ("teachers.reverse.domains=[arith]", "teachers.reverse.domains"),
    ("teachers.arith.domains=[]", "teachers.arith.domains"),
    ("logger.wandb_mode=sometimes", "logger.wandb_mode"),
    ("num_steps=0", "num_steps"),
    ("algo.alpha=-1", "algo.alpha"),
    ("max_sampled_tokens=-1", "max_sampled_tokens"),
    ("rollout.sample_from=teacher", "rollout.sample_from"),
    ("rollout.sample_from=both", "rollout.sample_from"),
    ("rollout.top_k=0", "rollout.top_k"),
    ("rollout.cpus_per_engine=-1", "rollout.cpus_per_engine"),
    ("rollout.request_timeout_s=0", "rollout.request_timeout_s"),
    ("ray_num_cpus=-4", "ray_num_cpus"),
    ("trainer.tp_size=0", "trainer.tp_size"),
    ("trainer.ep_size=4", "trainer.ep_size"),
    ("trainer.weight_sync=distributed", "trainer.weight_sync"),
    ("toy.domains=[arith,chemistry]", "toy.domains"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        to_job_config(_compose("experiment=dry_run", override))
    assert err.value.field_name == field
    assert "expected" in str(err.value)


def test_mopd_without_teachers_is_an_error():
    with pytest.raises(ConfigError, match="teachers"):
        to_job_config(_compose("student=hf", "student.model_path=/m", "data=jsonl", "data.train_files=[x]"))


def test_missing_model_path_is_reported():
    cfg = _compose("student=hf", "data=jsonl", "data.train_files=[x]", "trainer.loss=grpo")
    with pytest.raises(ConfigError, match="student.model_path.*required"):
        to_job_config(cfg)


def test_wrong_types_fail_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError), match="num_engines"):
        _compose("experiment=dry_run", "rollout.num_engines=many")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose("experiment=dry_run", "rollout.no_such_field=1")


def test_composition_errors_become_config_errors_naming_the_field():
    with pytest.raises(ConfigError) as err:
        check_command_line(["experiment=dry_run", "rollout.num_engines=many"])
    assert err.value.field_name == "rollout.num_engines" and "an integer" in str(err.value)


def test_keys_added_with_plus_must_exist_in_the_schema():
    with pytest.raises(ConfigError) as err:
        to_job_config(_compose("experiment=dry_run", "+rollout.not_a_field=1"))
    assert err.value.field_name == "rollout.not_a_field"
    # a new teacher is a new key of a dict of TeacherConfig: allowed; its own fields are checked
    assert "sort" in to_job_config(_compose("experiment=dry_run", "+teacher@teachers.sort=toy_sort")).teachers
    with pytest.raises(ConfigError, match="teachers.sort.tempo"):
        to_job_config(_compose("experiment=dry_run", "+teacher@teachers.sort=toy_sort", "+teachers.sort.tempo=1"))


def test_nan_and_inf_are_refused_everywhere():
    for override, field in (("trainer.eps_high=nan", "trainer.eps_high"), ("algo.alpha=inf", "algo.alpha"),
                            ("data.domain_weights.arith=nan", "data.domain_weights.arith")):
        with pytest.raises(ConfigError) as err:
            to_job_config(_compose("experiment=dry_run", override))
        assert err.value.field_name == field and "finite" in str(err.value)


def test_default_run_dir_is_outputs_date_time_and_hydra_writes_there():
    cfg = _compose_default("experiment=dry_run")
    first = cfg.run_dir
    time.sleep(1.1)
    assert first.startswith("outputs/") and cfg.run_dir == first  # cached: one value per composed config
    assert cfg.toy.dir == f"{first}/toy"
    assert _compose("experiment=dry_run").run_dir == "/tmp/mopd-config-test"


def _compose_default(*overrides: str):
    with initialize_config_module(config_module="configs", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_teacher_yaml_files_are_valid_teacher_configs():
    names = sorted(p.stem for p in (Path(__file__).parents[2] / "configs" / "teacher").glob("*.yaml"))
    for name in names:
        if name == "sglang_example":
            continue
        job = to_job_config(_compose("experiment=dry_run", f"+teacher@teachers.extra_{name}={name}",
                                     f"teachers.extra_{name}.domains=[d_{name}]"))
        assert job.teachers[f"extra_{name}"].backend in ("local", "sglang", "remote")


def test_trainer_layout_is_checked_against_the_student_before_anything_starts(tmp_path):
    """tp_size=3 cannot split a model with 4 attention heads: refused by the start-up checks, naming the field."""
    from transformers import Qwen3Config

    from mopd.job import preflight

    model = tmp_path / "student"
    Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8).save_pretrained(model)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "domain": "arith", "label": "2"}\n')
    job = to_job_config(_compose("student=hf", f"student.model_path={model}", "data=jsonl",
                                 f"data.train_files=[{data}]", "trainer.loss=grpo", "trainer.tp_size=3"))
    with pytest.raises(ConfigError, match="trainer.tp_size"):
        preflight(job)

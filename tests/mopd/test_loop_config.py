"""Start-up checks of the loop, the scheduler, partial rollout, staleness and dynamic sampling together."""

import pytest
from hydra import compose, initialize_config_module

from mopd.config import register_configs, to_job_config
from mopd.core.errors import ConfigError

register_configs()


def _job(*overrides: str):
    with initialize_config_module(config_module="configs", version_base=None):
        cfg = compose(config_name="config", overrides=["run_dir=/tmp/mopd-loop-test", *overrides])
    return to_job_config(cfg)


@pytest.mark.parametrize("overrides, field", [
    (["loop=async"], "loop"),
    (["loop=overlap"], "loop"),  # the batch scheduler cannot overlap
    (["rollout.partial_rollout=true"], "rollout.partial_rollout"),
    (["dynamic_sampling.filter_groups=true"], "dynamic_sampling.filter_groups"),
    (["rollout.scheduler=sequence", "rollout.partial_rollout=true", "rollout.max_staleness=0"],
     "rollout.max_staleness"),
    (["rollout.scheduler=sequence", "loop=overlap", "rollout.max_staleness=0"], "rollout.max_staleness"),
    (["rollout.scheduler=sequence", "dynamic_sampling.filter_kl_threshold=-0.1"],
     "dynamic_sampling.filter_kl_threshold"),
    (["rollout.scheduler=sequence", "dynamic_sampling.max_filtered_batches=-1"],
     "dynamic_sampling.max_filtered_batches"),
    (["data.pass_rate_low=0.9", "data.pass_rate_high=0.5"], "data.pass_rate_high"),
    (["data.pass_rate_keep=0"], "data.pass_rate_keep"),
    (["data.pass_rate_min_samples=0"], "data.pass_rate_min_samples"),
])
def test_bad_combinations_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _job("experiment=dry_run", *overrides)
    assert err.value.field_name == field


def test_teacher_generation_stays_on_the_batch_path():
    with pytest.raises(ConfigError) as err:
        _job("experiment=dry_run", "trainer.loss=sft", "rollout.sample_from=teacher", "rollout.scheduler=sequence")
    assert err.value.field_name == "rollout.scheduler"


@pytest.mark.parametrize("overrides", [
    [],
    ["rollout.scheduler=sequence"],
    ["rollout.scheduler=sequence", "rollout.partial_rollout=true", "dynamic_sampling.filter_groups=true"],
    ["rollout.scheduler=sequence", "loop=overlap", "rollout.max_staleness=2"],
    ["data.pass_rate_weighting=true"],  # the batch path records rewards too
])
def test_good_combinations_pass(overrides):
    _job("experiment=dry_run", *overrides)


def test_the_async_dry_run_experiment_composes():
    job = _job("experiment=dry_run_async")
    assert (job.loop, job.rollout.scheduler, job.rollout.partial_rollout) == ("overlap", "sequence", True)

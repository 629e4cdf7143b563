"""`mopd-train`: the MOPD step loop.

    generate -> score (verifier rewards + teacher logprobs) -> advantages -> train -> push weights
    -> [evaluate held-out prompts] -> log -> checkpoint

Each step is one short function (mopd/steps.py, shared with the overlap loop that loop=overlap runs:
mopd/train_async.py); the packages that own the work (rollout/, trainer/, mopd/teachers, mopd/rewards)
do the heavy lifting.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from mopd import job as job_lib
from mopd import train_async
from mopd.config import JobConfig, config_error_from, register_configs, to_job_config
from mopd.core.errors import ConfigError
from mopd.evaluate import check_heldout_files
from mopd.steps import (
    compute_advantages,
    end_step,
    eval_due,
    finished,
    generate,
    push_weights,
    score,
    start,
    step_metrics,
    timed,
    train,
)

# with the phases, for callers that drive a step themselves (tests of faults mid-step)
__all__ = ["check_command_line", "compute_advantages", "eval_due", "generate", "main", "push_weights", "run",
           "score", "step_metrics", "train"]

log = logging.getLogger("mopd.train")
register_configs()


def run(job: JobConfig, config_dict: dict | None = None) -> None:
    if job.loop == "overlap":
        return train_async.run(job, config_dict)
    rt, heldout = start(job, config_dict)
    try:
        step = rt.start_step
        while not finished(rt, step):
            timings: dict[str, float] = {}
            with timed(timings, "step"):
                with timed(timings, "generate"):
                    samples = generate(rt)
                with timed(timings, "score"):
                    score(rt, samples)
                compute_advantages(rt, samples)
                with timed(timings, "train"):
                    train_metrics = train(rt, samples)
                with timed(timings, "push"):
                    push_weights(rt)
            end_step(rt, step, samples, train_metrics, timings, heldout)
            step += 1
    finally:
        rt.close()


def check_config(cfg: DictConfig) -> JobConfig:
    """Every start-up check that builds and starts nothing: types, keys, ranges, the machine, files, data rows.

    `mopd-train` runs these first (`to_job_config`, then `job.start` -> `prepare` -> `preflight`,
    before the toy world is built or Ray starts); `mopd-train ... --cfg job` runs only these.
    """
    job = to_job_config(cfg)
    job_lib.preflight(job)
    check_heldout_files(job)
    return job


def compose_config(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> DictConfig:
    """The job config composed as `mopd-train` composes it (Hydra compose API, no run directory)."""
    from hydra import compose, initialize_config_module

    if config_dir:  # what --config-dir does: search the user's directory first
        overrides = [*overrides, f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]"]
    try:
        with initialize_config_module(config_module="configs", version_base=None):
            return compose(config_name=config_name, overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - every composition failure is a config error, named
        raise config_error_from(e) from None


def check_command_line(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> JobConfig:
    """Compose and check a command line's overrides in-process: the checks `mopd-train` runs first."""
    return check_config(compose_config(overrides, config_name, config_dir))


_task_started = False


@hydra.main(version_base=None, config_path="pkg://configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    try:
        run(to_job_config(cfg))  # job.start runs job_lib.preflight before building or starting anything
    except ConfigError as e:  # a user error: say what is wrong, no traceback
        log.error("%s", e)
        sys.exit(2)


def main() -> None:
    """`mopd-train`: Hydra's CLI, with every config error (composition included) exiting 2 and naming the field.

    Hydra reports its own errors (a wrong type, an unknown config group) and exits 1; it raises
    them instead when HYDRA_FULL_ERROR=1, which lets them be reported like every other config
    error. `--cfg` prints the config without running the job, then checks it (exit 2 if invalid).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    args = get_args_parser().parse_args()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
        if args.cfg and not (args.help or args.hydra_help):  # printed; now the verdict: exit 0 or 2
            check_command_line(args.overrides, args.config_name or "config", args.config_dir)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    except Exception as e:  # only errors before the job started are config errors
        if _task_started:
            raise
        log.error("%s", config_error_from(e))
        sys.exit(2)


if __name__ == "__main__":
    main()

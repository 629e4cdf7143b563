"""`mopd-train loop=overlap`: the MOPD step loop with generation overlapped with training.

    the sequence scheduler generates (and scores) all the time, continuous=True:
    take the next batch of scored groups -> advantages -> train (generation goes on) -> push weights
    (sequences paused, resumed on the new version) -> [evaluate] -> log -> checkpoint

A batch may thus hold tokens sampled by older weights; rollout.max_staleness bounds how many versions
old (the scheduler stops refilling, and drops or regenerates older sequences: rollout/scheduler.py), and
the loss corrects per token for the policy that sampled it. The phases are mopd/steps.py's, as in the
sync loop (mopd/train.py).
"""

from __future__ import annotations

from mopd.config import JobConfig
from mopd.steps import compute_advantages, end_step, finished, generate, push_weights, start, timed, train


def run(job: JobConfig, config_dict: dict | None = None) -> None:
    rt, heldout = start(job, config_dict)
    try:
        step = rt.start_step
        while not finished(rt, step):
            timings: dict[str, float] = {}
            with timed(timings, "step"):
                with timed(timings, "wait_batch"):  # generated while the previous steps trained
                    samples = generate(rt)
                compute_advantages(rt, samples)
                with timed(timings, "train"):
                    train_metrics = train(rt, samples)
                with timed(timings, "push"):
                    push_weights(rt)
            end_step(rt, step, samples, train_metrics, timings, heldout)
            step += 1
    finally:
        rt.close()

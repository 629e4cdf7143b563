"""The dry run with rollout.scheduler=sequence through the real CLI (Ray, local engines, teachers, Megatron on CPU):
partial rollout in the sync loop and the overlap loop, each stopped with sequences in flight and resumed. Every
prompt drawn is trained exactly once or still waits in the scheduler's saved state; staleness stays bounded."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mopd.checkpoint import read_scheduler_state
from tests.test_dry_run_e2e import _metrics, _train

pytestmark = pytest.mark.slow

BASE = ["experiment=dry_run", "toy.teacher_steps=60", "logger.progress=false", "rollout.scheduler=sequence",
        "rollout.partial_rollout=true", "rollout.max_staleness=1", "rollout.stale_policy=regenerate"]
STEPS = 20  # as the batch dry run (tests/test_dry_run_e2e.py): the toy KL is noisy over fewer steps
STOP = 5  # the first partial run stops here, with sequences in flight
GROUP = 4  # dry_run's rollout.n_samples_per_prompt


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory) -> tuple[Path, dict]:
    """Sync loop, partial rollout: STOP steps, then resumed to STEPS; the scheduler state saved at the stop."""
    run_dir = tmp_path_factory.mktemp("partial") / "run"
    proc = _train(*BASE, f"run_dir={run_dir}", f"num_steps={STOP}", "save_interval=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    at_stop = read_scheduler_state(run_dir / "checkpoints" / f"step_{STOP}")
    proc = _train(*BASE, f"run_dir={run_dir}", f"num_steps={STEPS}", "save_interval=0", "resume=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir, at_stop


@pytest.fixture(scope="module")
def overlap_run(partial_run) -> Path:
    """The overlap loop, also stopped at STOP (generation running ahead of the trainer) and resumed."""
    run_dir = partial_run[0].parent / "overlap"
    for steps, more in ((STOP, []), (STEPS, ["resume=true"])):
        proc = _train(*BASE, f"run_dir={run_dir}", f"toy.dir={partial_run[0] / 'toy'}", "loop=overlap",
                      f"num_steps={steps}", "save_interval=0", *more)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir


def _pending(state: dict) -> list[int]:
    """Prompt positions the scheduler holds: finished groups waiting for a batch, groups queued or in flight."""
    return [g["originals"][0]["prompt_index"] for g in [*state["done"], *state["groups"]]]


def _check_every_prompt_once(run_dir: Path) -> None:
    trained: Counter[int] = Counter()
    steps_of: dict[int, set[int]] = {}
    for step in range(STEPS):
        for line in (run_dir / "samples" / f"step_{step}.jsonl").read_text().splitlines():
            position = json.loads(line)["prompt_index"]
            trained[position] += 1
            steps_of.setdefault(position, set()).add(step)
    assert set(trained.values()) == {GROUP}, "a group trained with too few or too many samples"
    assert all(len(steps) == 1 for steps in steps_of.values()), "a prompt trained in two steps"
    last = run_dir / "checkpoints" / f"step_{STEPS}"
    consumed = json.loads((last / "driver.json").read_text())["data"]["consumed"]
    drawn = {k * len(consumed) + i for i, source in enumerate(sorted(consumed)) for k in range(consumed[source])}
    pending = _pending(read_scheduler_state(last))
    assert not set(pending) & set(trained), "a prompt trained and still pending"
    assert sorted([*trained, *pending]) == sorted(drawn), "a prompt drawn from the data was lost or repeated"


def test_stopped_with_sequences_in_flight_and_resumed_without_losing_or_repeating_a_prompt(partial_run):
    run_dir, at_stop = partial_run
    partial = [s for g in at_stop["groups"] for s in g["samples"] if s and not s["finished"]]
    assert partial and any(s["sample"]["response_ids"] for s in partial), "no partial sequence saved at the stop"
    assert [m["step"] for m in _metrics(run_dir)] == list(range(STEPS))
    _check_every_prompt_once(run_dir)
    held = set(_pending(at_stop))  # what was in flight at the stop was trained after the resume (or still waits)
    later = {json.loads(line)["prompt_index"] for step in range(STOP, STEPS)
             for line in (run_dir / "samples" / f"step_{step}.jsonl").read_text().splitlines()}
    assert held <= later | set(_pending(read_scheduler_state(run_dir / "checkpoints" / f"step_{STEPS}")))


def test_overlap_loop_stopped_and_resumed_trains_every_prompt_once(overlap_run):
    assert [m["step"] for m in _metrics(overlap_run)] == list(range(STEPS))
    _check_every_prompt_once(overlap_run)


@pytest.mark.parametrize("which", ["partial", "overlap"])
def test_metrics_and_staleness_bound(which, partial_run, overlap_run):
    metrics = _metrics(partial_run[0] if which == "partial" else overlap_run)
    for m in metrics:
        for key in ("rollout/staleness_mean", "rollout/staleness_max", "rollout/filtered_groups",
                    "rollout/partial_samples", "rollout/engine_busy_frac", "train/loss", "mopd/reverse_kl/arith"):
            assert isinstance(m.get(key), (int, float)), (key, m)
        assert 0 <= m["rollout/staleness_mean"] <= m["rollout/staleness_max"] <= 1  # rollout.max_staleness
    # pass rates cover the groups scored since the previous step (mopd/dynamic_sampling.py): a domain none of
    # whose groups finished in that window (its batch share finished earlier and waited) has no value that step
    for domain in ("arith", "reverse"):
        rates = [m[f"rollout/pass_rate/{domain}"] for m in metrics if f"rollout/pass_rate/{domain}" in m]
        assert len(rates) >= len(metrics) // 2 and all(0 <= r <= 1 for r in rates), (domain, rates)
    assert any(m["rollout/partial_samples"] > 0 for m in metrics), "no sequence continued across a push"
    assert any(m["rollout/staleness_max"] == 1 for m in metrics)


def test_reverse_kl_falls_in_at_least_one_mode(partial_run, overlap_run):
    falls = {}
    for name, run_dir in (("partial", partial_run[0]), ("overlap", overlap_run)):
        metrics = _metrics(run_dir)
        for teacher in ("arith", "reverse"):
            kl = [m[f"mopd/reverse_kl/{teacher}"] for m in metrics]
            falls[name, teacher] = sum(kl[:5]) / 5 - sum(kl[-5:]) / 5
    assert any(all(falls[name, t] > 0.3 for t in ("arith", "reverse")) for name in ("partial", "overlap")), falls

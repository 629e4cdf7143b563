"""Rollout by sequence, not by batch: throughput and learning of four modes at the same sampled tokens (issue #15).

    python benchmarks/scheduler/run.py            # the full benchmark (README: its time and numbers)
    python benchmarks/scheduler/run.py --quick    # the same code path, tiny, for the tests

1. builds the world (world.py): the heavy-tailed `echo` domain, a warmed-up student and an echo teacher;
2. runs `mopd-train --config-dir benchmarks/scheduler/configs experiment=scheduler_bench` once per mode (MODES)
   and repeat, interleaved (a b c d a b c d ...), every mode with the same seed in a repeat and the same
   `max_sampled_tokens`; a probe (probe.py) watches each run's student engines and metrics.jsonl from outside;
3. measures each run's final policy on the world's held-out prompts: exact per-token reverse KL to the teacher
   on the policy's own samples (`mopd.evaluate.reverse_kl_to_teacher`), the same prompts and draws' seed for
   every run, so the modes are compared at equal sampled tokens on the same footing;
4. writes results.md (the table, ratios against (a)), results.json and scheduler.png (report.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.long_answers.report import mean_ci as t_interval
from benchmarks.scheduler.probe import Probe
from benchmarks.scheduler.report import KL, avg, mean_ci, plot, summarize_run, table, tail_points
from benchmarks.scheduler.world import FULL_WORLD, QUICK_WORLD, World, build_world
from mopd.eval_cli import resolve_checkpoint

log = logging.getLogger("scheduler_bench")
CONFIGS = Path(__file__).resolve().parent / "configs"
SEQUENCE = ["rollout.scheduler=sequence"]
PARTIAL = [*SEQUENCE, "rollout.partial_rollout=true"]
# slug -> (row name, overrides of configs/experiment/scheduler_bench.yaml)
MODES: dict[str, tuple[str, list[str]]] = {
    "a": ("(a) batch (today)", ["rollout.scheduler=batch"]),
    "b": ("(b) sequence scheduler", SEQUENCE),
    "c": ("(c) + partial rollout", PARTIAL),
    "d": ("(d) + overlap loop", [*PARTIAL, "loop=overlap"]),
}
FULL = {"world": FULL_WORLD, "budget": 30_000, "tokens_per_step": 600, "repeats": 2, "timeout_s": 1200,
        "rollout": [], "heldout_samples": 8}
QUICK = {"world": QUICK_WORLD, "budget": 1_500, "tokens_per_step": 300, "repeats": 1, "timeout_s": 600,
         "rollout": ["rollout.prompts_per_step=8"], "heldout_samples": 2}
HELDOUT_MAX_NEW_TOKENS = 56  # configs/experiment/scheduler_bench.yaml's rollout.max_new_tokens


def train_run(world: World, run_dir: Path, overrides: list[str], setup: dict, seed: int, extra: list[str]) -> Path:
    """One `mopd-train` run under the probe (reused when it finished before); the log is run_dir/train.log."""
    if (run_dir / "done.json").is_file():
        return run_dir
    args = ["--config-dir", str(CONFIGS), "experiment=scheduler_bench", f"run_dir={run_dir}",
            f"student.model_path={world.student}", f"teachers.echo.model_path={world.teacher('echo')}",
            f"data.train_files=[{world.train_file}]", f"max_sampled_tokens={setup['budget']}",
            f"trainer.total_steps={max(1, setup['budget'] // setup['tokens_per_step'])}", f"seed={seed}",
            f"data.seed={seed}", f"trainer.seed={1234 + seed}", *setup["rollout"], *overrides, *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a half-finished earlier attempt
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1")
    start = time.time()
    with open(run_dir / "train.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mopd.train", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env)
        probe = Probe(proc.pid, run_dir / "metrics.jsonl", [world.teacher("echo")]).start()
        try:
            code = proc.wait(timeout=setup["timeout_s"])
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
            seen = probe.stop()
    if code != 0:
        raise RuntimeError(f"{run_dir}: mopd-train exited with {code}\n" + (run_dir / "train.log").read_text()[-4000:])
    (run_dir / "probe.json").write_text(json.dumps({"line_times": seen.line_times,
                                                    "ticks": [asdict(t) for t in seen.ticks]}))
    (run_dir / "done.json").write_text(json.dumps({"wall_s": time.time() - start, "args": args}))
    log.info("%s: %.0f s", run_dir.name, time.time() - start)
    return run_dir


def heldout_kl(world: World, model: Path, cache: Path, samples: int) -> float:
    """Per-token reverse KL of `model` to the echo teacher on the world's held-out prompts (cached in `cache`)."""
    if not cache.is_file():
        from mopd.evaluate import load_eval_rows, reverse_kl_to_teacher

        rows = load_eval_rows(world.test_file, per_domain=10_000)
        result = reverse_kl_to_teacher(model, world.teacher("echo"), rows, samples=samples,
                                       max_new_tokens=HELDOUT_MAX_NEW_TOKENS, seed=0)
        cache.write_text(json.dumps(result))
    return json.loads(cache.read_text())["echo"]["reverse_kl"]


def verdict(names: dict[str, str], runs: dict[str, list[dict]], budget: int) -> dict:
    """The issue's targets: the fastest of (c)/(d) against (a) in samples/s, and their learning at equal tokens."""
    sps = {s: avg(rs, "samples_per_s") for s, rs in runs.items()}
    if "a" not in runs or not {"c", "d"} & set(runs):
        return {}
    fast = max((s for s in ("c", "d") if s in runs), key=sps.__getitem__)
    # the same repeat of two modes ran minutes apart on the same seed: their ratio is less exposed to the load drift
    paired = [f["samples_per_s"] / a["samples_per_s"] for f, a in zip(runs[fast], runs["a"])]
    out = {"fastest": fast, "speedup": sps[fast] / sps["a"], "speedup_target_met": sps[fast] / sps["a"] >= 1.5,
           "paired_ratios": paired, "paired_geomean": math.exp(statistics.fmean(math.log(r) for r in paired))}
    for label, key in (("reverse_kl", 1), ("reward", 2)):
        (ma, ha), (mf, hf) = mean_ci(tail_points(runs["a"], key, budget)), mean_ci(tail_points(runs[fast], key, budget))
        out[label] = {"a": ma, fast: mf, "diff": mf - ma, "noise": math.hypot(ha, hf),
                      "within_noise": abs(mf - ma) <= math.hypot(ha, hf)}
    diffs = [f["heldout_kl"] - a["heldout_kl"] for f, a in zip(runs[fast], runs["a"])]  # same seed: paired
    mean, half = t_interval(diffs)
    out["heldout_kl"] = {"diffs": diffs, "diff": mean, "ci": half, "within_noise": abs(mean) <= half}
    out["text"] = (f"{names[fast]}: {out['speedup']:.2f}x the samples/s of {names['a']} (target 1.5x: "
                   f"{'met' if out['speedup_target_met'] else 'missed'}; repeat by repeat "
                   f"{', '.join(f'{r:.2f}' for r in paired)}, geometric mean {out['paired_geomean']:.2f}x); at equal sampled tokens (last 25% of the "
                   f"budget) reverse KL {out['reverse_kl']['diff']:+.3f} ± {out['reverse_kl']['noise']:.3f} nats, "
                   f"reward {out['reward']['diff']:+.3f} ± {out['reward']['noise']:.3f} against (a): "
                   f"{'within' if out['reverse_kl']['within_noise'] else 'outside'} noise on reverse KL; the final "
                   f"policies' held-out reverse KL, paired by seed: {mean:+.3f} ± {half:.3f} nats "
                   f"({'within' if out['heldout_kl']['within_noise'] else 'outside'} noise).")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "scheduler")
    p.add_argument("--quick", action="store_true", help="tiny world and budget, one repeat: minutes, not targets")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--repeats", type=int, help="runs per mode (seeds 0..R-1), interleaved across modes")
    p.add_argument("--budget", type=int, help="sampled response tokens per run (max_sampled_tokens)")
    p.add_argument("overrides", nargs="*", help="extra mopd-train overrides shared by every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    setup = dict(QUICK if args.quick else FULL)
    setup["budget"] = args.budget or setup["budget"]
    setup["repeats"] = args.repeats or setup["repeats"]
    slugs = [s for s in MODES if s in args.modes.split(",")]
    if not slugs:
        p.error(f"--modes: none of {args.modes!r} is a mode; expected a subset of {','.join(MODES)}")
    t0 = time.time()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout  # the tree may hold uncommitted work too
    world = build_world(args.out / "world", setup["world"])
    runs: dict[str, list[dict]] = {s: [] for s in slugs}
    for seed in range(setup["repeats"]):
        for slug in slugs:
            run_dir = train_run(world, args.out / "runs" / f"{slug}_seed{seed}", MODES[slug][1], setup, seed,
                                args.overrides)
            runs[slug].append({**summarize_run(run_dir, setup["budget"]),
                               "heldout_kl": heldout_kl(world, resolve_checkpoint(run_dir), run_dir / "heldout.json",
                                                        setup["heldout_samples"])})
    base_kl = {"student": heldout_kl(world, world.student, args.out / "heldout_student.json", setup["heldout_samples"]),
               "teacher": 0.0}
    names = {s: MODES[s][0] for s in slugs}
    text = table(names, runs, setup["budget"], base_kl["student"])
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick, "git_head": head.strip(),
              "command": " ".join(["run.py", *(argv if argv is not None else sys.argv[1:])]),
              "setup": {k: (asdict(v) if k == "world" else v) for k, v in setup.items()},
              "modes": {s: {"name": names[s], "overrides": MODES[s][1], "runs": runs[s]} for s in slugs},
              "verdict": verdict(names, runs, setup["budget"]), "heldout_reference": base_kl, "total_s": time.time() - t0, "learning_key": KL}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(text + "\n" + result["verdict"].get("text", "") + "\n")
    png = plot(names, runs, args.out / "scheduler.png")
    print(text)
    print(result["verdict"].get("text", ""))
    print(f"plot: {png}\nwall time: {result['total_s'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()

"""MOPD against its baselines on three toy domains, at an equal sampled-token budget (GitHub issue #6).

    python benchmarks/mopd_vs_baselines/run.py                 # the full benchmark (~27 min, 2 CPU cores)
    python benchmarks/mopd_vs_baselines/run.py --quick         # the same code path in a few minutes

1. builds the world: a weak generalist base student and one SFT expert per domain from it (world.py);
2. trains from the base student through `mopd-train experiment=mopd_toy3` (one subprocess per method,
   same `max_sampled_tokens`): MOPD, MOPD without outcome reward, mixed-domain GRPO, and SFT on
   samples of each prompt's domain teacher; builds the parameter merges of the teachers;
3. evaluates every model (and every intermediate checkpoint) on held-out prompts of every domain and
   writes results.md (table), results.json (all numbers) and accuracy_vs_tokens.png under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import STUDENT, TEACHER, normalized_score, plot_curves, results_table  # noqa: E402
from world import FULL_WORLD, QUICK_WORLD, World, build_world  # noqa: E402

from mopd import merge  # noqa: E402
from mopd.checkpoint import DRIVER_FILE  # noqa: E402
from mopd.evaluate import evaluate, load_eval_rows  # noqa: E402

log = logging.getLogger("mopd_vs_baselines")
REPO = Path(__file__).resolve().parents[2]

# Each method is the shared experiment config plus these overrides; nothing else differs.
# MOPD's teacher term uses each teacher's top-8 distribution (algo.teacher_top_k, forward KL), the variant that
# learned fastest here; the report's sampled-token reward (eq. 7) is the row after it.
TOP_K = ["algo.teacher_top_k=8", "algo.top_k_divergence=forward_kl"]
METHODS: dict[str, list[str]] = {
    "MOPD": ["trainer.loss=mopd", *TOP_K],
    "MOPD w/o outcome reward": ["trainer.loss=mopd", "algo.alpha=0", *TOP_K],
    "MOPD, sampled-token reward": ["trainer.loss=mopd"],
    "Mixed-domain RL (GRPO)": ["trainer.loss=grpo", "algo.alpha=1.0"],
    "Off-policy finetune (SFT on teacher samples)": ["trainer.loss=sft", "rollout.sample_from=teacher"],
}
SLUGS = {"MOPD": "mopd", "MOPD w/o outcome reward": "mopd_no_orm", "MOPD, sampled-token reward": "mopd_sampled",
         "Mixed-domain RL (GRPO)": "grpo",
         "Off-policy finetune (SFT on teacher samples)": "offpolicy_sft"}
MERGE_AVERAGE = "Merge: weight average"
MERGE_TASK = "Merge: task arithmetic"
TASK_SCALES = (0.3, 0.5, 0.7, 1.0)
# Sampled response tokens per training step (48 samples of ~4.2 tokens, measured), so the shared cosine
# schedule ends where the token budget does.
TOKENS_PER_STEP = 200

FULL = dict(world=FULL_WORLD, budget=100_000, save_interval=50, eval_per_domain=200, eval_samples=4)
QUICK = dict(world=QUICK_WORLD, budget=800, save_interval=1, eval_per_domain=12, eval_samples=1)


def train_method(name: str, world: World, domains: list[str], run_dir: Path, budget: int, save_interval: int,
                 extra: list[str], reuse: bool) -> Path:
    """One `mopd-train` run of a method from the base student; its log is run_dir/train.log."""
    if reuse and _checkpoints(run_dir) and _checkpoints(run_dir)[-1][0] >= budget:
        log.info("%s: reusing %s", name, run_dir)
        return run_dir
    overrides = ["experiment=mopd_toy3", f"run_dir={run_dir}", f"student.model_path={world.student}",
                 f"data.train_files=[{world.train_file}]", f"max_sampled_tokens={budget}",
                 f"save_interval={save_interval}", f"trainer.total_steps={max(1, budget // TOKENS_PER_STEP)}"]
    for d in ("arith", "reverse", "sort"):
        overrides += [f"teachers.{d}.model_path={world.teacher(d)}"] if d in domains else \
            [f"~teachers.{d}", f"~data.domain_weights.{d}"]
    cmd = [sys.executable, "-m", "mopd.train", *overrides, *METHODS[name], *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1")
    log.info("%s: %s", name, " ".join(cmd[2:]))
    start = time.time()
    with open(run_dir / "train.log", "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-4000:]
        raise RuntimeError(f"{name}: mopd-train exited with {proc.returncode}\n{tail}")
    log.info("%s: trained in %.0f s", name, time.time() - start)
    return run_dir


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(sampled tokens, hf export dir) of every complete checkpoint, in training order."""
    found = []
    for d in (run_dir / "checkpoints").glob("step_*"):
        if (d / DRIVER_FILE).is_file() and (d / "hf").is_dir():
            state = json.loads((d / DRIVER_FILE).read_text())
            found.append((int(state["step"]), int(state["sampled_tokens"]), d / "hf"))
    return [(tokens, hf) for _, tokens, hf in sorted(found)]


def build_merges(world: World, domains: list[str], out: Path, val_rows: dict[str, list[dict]],
                 max_new_tokens: int = 12, kind: str = "greedy", samples: int = 0) -> dict[str, Path]:
    """Weight average of the teachers, and task arithmetic with its scale picked on `val_rows` (`kind` accuracy,
    `samples` draws when it is "sampled").

    Shared with benchmarks/long_answers (longer answers: `max_new_tokens`; many right answers: sampled).
    """
    teachers = [world.teacher(d) for d in domains]
    merged = {MERGE_AVERAGE: merge.average(teachers, out / "merge_average")}
    best = None
    for scale in TASK_SCALES:
        path = merge.task_arithmetic(world.student, teachers, out / f"merge_task_{scale}", scale=scale)
        acc = evaluate(path, val_rows, samples=samples, max_new_tokens=max_new_tokens)
        mean = sum(acc[d][kind] for d in domains) / len(domains)
        log.info("task arithmetic scale %.1f: mean %s accuracy on the selection prompts %.3f", scale, kind, mean)
        if best is None or mean > best[0]:
            best = (mean, scale, path)
    merged[MERGE_TASK] = best[2]
    return merged


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "mopd_vs_baselines")
    parser.add_argument("--quick", action="store_true", help="tiny world, budget and eval: minutes, not targets")
    parser.add_argument("--budget", type=int, help="sampled response tokens per method (max_sampled_tokens)")
    parser.add_argument("--save-interval", type=int, help="checkpoint (and evaluate) every N steps")
    parser.add_argument("--eval-per-domain", type=int, help="held-out prompts per domain")
    parser.add_argument("--methods", default=",".join(SLUGS.values()), help="comma-separated subset of "
                        + ",".join(SLUGS.values()))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs already under --out")
    parser.add_argument("overrides", nargs="*", help="extra mopd-train overrides shared by every method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    setup = QUICK if args.quick else FULL
    spec = setup["world"]
    budget = args.budget or setup["budget"]
    save_interval = args.save_interval or setup["save_interval"]
    per_domain = args.eval_per_domain or setup["eval_per_domain"]
    domains = list(spec.domains)
    wanted = [s.strip() for s in args.methods.split(",") if s.strip()]
    methods = [name for name, slug in SLUGS.items() if slug in wanted]
    times: dict[str, float] = {}
    t0 = time.time()

    world = build_world(args.out / "world", spec)
    times["world_s"] = time.time() - t0
    rows = load_eval_rows(world.test_file, per_domain)
    final: dict[str, dict] = {STUDENT: evaluate(world.student, rows, samples=setup["eval_samples"])}
    teachers = {d: evaluate(world.teacher(d), rows, samples=setup["eval_samples"]) for d in domains}
    final[TEACHER] = {d: teachers[d][d] for d in domains}
    for d in domains:
        log.info("teacher %s: %s", d, {k: round(v["greedy"], 3) for k, v in teachers[d].items()})

    t = time.time()
    merged = build_merges(world, domains, args.out, load_eval_rows(world.train_file, min(per_domain, 50)))
    for name, path in merged.items():
        final[name] = evaluate(path, rows, samples=setup["eval_samples"])
    times["merges_s"] = time.time() - t

    curves: dict[str, list[tuple[int, dict[str, float]]]] = {}
    start_point = (0, {d: final[STUDENT][d]["greedy"] for d in domains})
    for name in methods:
        t = time.time()
        run_dir = train_method(name, world, domains, args.out / SLUGS[name], budget, save_interval,
                               args.overrides, args.reuse)
        times[f"train_{SLUGS[name]}_s"] = time.time() - t
        t = time.time()
        points = [start_point]
        ckpts = _checkpoints(run_dir)
        for tokens, hf in ckpts[:-1]:
            acc = evaluate(hf, rows, samples=0)
            points.append((tokens, {d: acc[d]["greedy"] for d in domains}))
        final[name] = evaluate(ckpts[-1][1], rows, samples=setup["eval_samples"])
        points.append((ckpts[-1][0], {d: final[name][d]["greedy"] for d in domains}))
        curves[name] = points
        times[f"eval_{SLUGS[name]}_s"] = time.time() - t
        log.info("%s: %s", name, {d: round(final[name][d]["greedy"], 3) for d in domains})

    times["total_s"] = time.time() - t0
    order = [STUDENT, TEACHER, *methods, MERGE_AVERAGE, MERGE_TASK]
    final = {name: final[name] for name in order}
    table = results_table(final, domains, STUDENT, TEACHER)
    greedy = {n: {d: final[n][d]["greedy"] for d in domains} for n in final}
    scores = {n: normalized_score(greedy[n], greedy[STUDENT], greedy[TEACHER]) for n in final}
    flat = {n: greedy[n] for n in (STUDENT, TEACHER, MERGE_AVERAGE, MERGE_TASK)}
    plot = plot_curves(curves, flat, domains, args.out / "accuracy_vs_tokens.png")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
              "budget_tokens": budget, "save_interval": save_interval, "eval_per_domain": per_domain,
              "eval_samples": setup["eval_samples"], "world": {**asdict(spec), "domains": domains},
              "task_arithmetic_model": str(merged[MERGE_TASK].name), "shared_overrides": args.overrides,
              "methods": {n: METHODS[n] for n in methods}, "teachers_all_domains": teachers,
              "final": final, "normalized_score": scores, "curves": curves, "times": times,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    header = (f"Budget {budget} sampled tokens per method; {per_domain} held-out prompts per domain; greedy "
              f"accuracy, normalized score = mean over domains of (acc - student) / (teacher - student).\n\n")
    (args.out / "results.md").write_text(header + table)
    print(header + table)
    print(f"plot: {plot}\nwall time: {times['total_s'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()

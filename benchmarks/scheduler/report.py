"""The numbers of one benchmark run, per mode: throughput from the probe, learning from metrics.jsonl; table, plot.

Every rate is measured over the same window of a run: from the moment step 0's record lands in metrics.jsonl
to the moment the last one does (start-up, step 0's warm-up and the final checkpoint are outside it).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks.long_answers.report import mean_ci as t_interval

KL = "mopd/reverse_kl/echo"
REWARD = "rollout/reward/echo"
DRIFT = "train/kl_rollout/staleness_1"
TAIL = 0.25  # learning at equal tokens: the steps in the last quarter of the sampled-token budget


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize_run(run_dir: Path, budget: int) -> dict:
    """Throughput, idleness, staleness and learning of one `mopd-train` run, from metrics.jsonl and probe.json."""
    rows = metrics(run_dir)
    probe = json.loads((run_dir / "probe.json").read_text())
    times = probe["line_times"]
    if len(rows) < 3 or len(times) < len(rows):
        raise RuntimeError(f"{run_dir}: {len(rows)} steps logged, {len(times)} seen by the probe; need >= 3 of both")
    t0, t1 = times[0], times[len(rows) - 1]
    window = t1 - t0
    measured = rows[1:]  # the steps whose whole duration lies inside the window
    samples = sum(m["rollout/samples"] for m in measured)
    tokens = sum(m["rollout/tokens"] for m in measured)
    ticks = [t for t in probe["ticks"] if t0 <= t["t"] <= t1]
    if not ticks:
        raise RuntimeError(f"{run_dir}: the probe never reached a student engine during the measured steps")
    busy = [sum(r > 0 for r in t["running"].values()) / len(t["running"]) for t in ticks]
    loads = [r for t in ticks for r in t["running"].values() if r > 0]
    forwards = sum(ticks[-1]["forward_steps"][u] - ticks[0]["forward_steps"].get(u, 0)
                   for u in ticks[-1]["forward_steps"])
    train_s = sum(m.get("time/train_s", 0.0) for m in measured)
    tail = [m for m in rows if m["rollout/total_tokens"] >= (1 - TAIL) * budget]
    return {
        "steps": len(rows), "window_s": window, "samples_per_s": samples / window, "tokens_per_s": tokens / window,
        "engine_busy_frac": statistics.fmean(busy),
        "engine_running_mean": statistics.fmean(loads) if loads else 0.0,
        "tokens_per_forward": tokens / forwards if forwards > 0 else None,
        # how long one engine forward took while busy: rises when the engines share the CPU with driver and trainer
        "ms_per_forward": 1000 * statistics.fmean(busy) * window * len(ticks[-1]["forward_steps"]) / forwards
        if forwards > 0 else None,
        "scheduler_busy_frac": _mean(measured, "rollout/engine_busy_frac", default=None),  # its own view, if any
        "trainer_idle_frac": 1.0 - train_s / window,
        "staleness_mean": _mean(measured, "rollout/staleness_mean", default=0.0),
        "staleness_max": max((m.get("rollout/staleness_max", 0.0) for m in measured), default=0.0),
        # how far the policy moved in one version (log mu - log pi_theta of the tokens one version old), every step
        # that trained any: what decides whether staleness costs learning (README, "Latest")
        "drift_per_version": _mean(rows, DRIFT, default=None),
        "aborted_tokens": sum(m.get("rollout/aborted_tokens", 0.0) for m in measured),
        "response_len": tokens / max(samples, 1),
        "kl_tail": _mean(tail, KL), "reward_tail": _mean(tail, REWARD),
        "curve": [[m["rollout/total_tokens"], m.get(KL, math.nan), m.get(REWARD, math.nan)] for m in rows],
    }


def _mean(rows: list[dict], key: str, default: float | None = math.nan) -> float | None:
    values = [m[key] for m in rows if key in m and m[key] is not None]
    return statistics.fmean(values) if values else default


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal interval (0 for a single value)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, (1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def tail_points(runs: list[dict], key: int, budget: int) -> list[float]:
    """Every step's value in the last quarter of the budget, over all repeats: the noise of the learning number."""
    return [p[key] for r in runs for p in r["curve"] if p[0] >= (1 - TAIL) * budget]


def avg(runs: list[dict], key: str) -> float:
    """Mean of one number over a mode's repeats (NaN when no run has it)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.fmean(values) if values else math.nan


COLUMNS = [("samples/s", "samples_per_s", "{:.1f}"), ("tokens/s", "tokens_per_s", "{:.0f}"),
           ("engine busy", "engine_busy_frac", "{:.2f}"), ("tokens/forward", "tokens_per_forward", "{:.1f}"),
           ("ms/forward", "ms_per_forward", "{:.1f}"),
           ("trainer idle", "trainer_idle_frac", "{:.2f}"), ("staleness mean", "staleness_mean", "{:.2f}"),
           ("drift per version", "drift_per_version", "{:.4f}")]


def table(names: dict[str, str], runs: dict[str, list[dict]], budget: int, student_kl: float) -> str:
    """Markdown: throughput columns (mean over repeats), ratios against the first mode, learning in the last quarter
    of the training batches and the final policies' held-out reverse KL (mean ± 95% t-interval over repeats)."""
    base = avg(next(iter(runs.values())), "samples_per_s")
    head = ["mode", "runs", *[c[0] for c in COLUMNS[:1]], "vs (a)", *[c[0] for c in COLUMNS[1:]],
            "reverse KL, last 25% of tokens", "reward, last 25% of tokens",
            f"held-out reverse KL, final (student {student_kl:.3f})"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for slug, rs in runs.items():
        cells = [names[slug], str(len(rs))]
        for i, (_, key, fmt) in enumerate(COLUMNS):
            cells.append("n/a" if math.isnan(avg(rs, key)) else fmt.format(avg(rs, key)))
            if i == 0:
                cells.append(f"{avg(rs, 'samples_per_s') / base:.2f}x")
        for key in (1, 2):
            mean, half = mean_ci(tail_points(rs, key, budget))
            cells.append(f"{mean:.3f} ± {half:.3f}")
        mean, half = t_interval([r["heldout_kl"] for r in rs])
        cells.append(f"{mean:.3f} ± {half:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _smooth(points: list[list[float]], key: int, width: int = 5) -> tuple[list[float], list[float]]:
    xs = [p[0] for p in points]
    ys = [p[key] for p in points]
    return xs, [statistics.fmean(ys[max(0, i - width + 1):i + 1]) for i in range(len(ys))]


def plot(names: dict[str, str], runs: dict[str, list[dict]], path: Path) -> Path:
    """Reverse KL and reward against sampled tokens (5-step moving mean, one line per run), samples/s bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (slug, rs) in enumerate(runs.items()):
        for j, r in enumerate(rs):
            for ax, key in ((axes[0], 1), (axes[1], 2)):
                ax.plot(*_smooth(r["curve"], key), color=colors[i % len(colors)], alpha=0.85,
                        label=names[slug] if j == 0 else None)
    axes[0].set(xlabel="sampled tokens", ylabel="reverse KL to the teacher (nats/token)", title="learning: reverse KL")
    axes[1].set(xlabel="sampled tokens", ylabel="reward (exact match)", title="learning: reward")
    axes[0].legend(fontsize=8)
    sps = [avg(rs, "samples_per_s") for rs in runs.values()]
    axes[2].bar(range(len(runs)), sps, color=[colors[i % len(colors)] for i in range(len(runs))])
    axes[2].set_xticks(range(len(runs)), [names[s].split(")")[0] + ")" for s in runs])
    axes[2].set(ylabel="samples/s", title="throughput (measured steps)")
    for i, (v, rs) in enumerate(zip(sps, runs.values())):
        axes[2].scatter([i] * len(rs), [r["samples_per_s"] for r in rs], color="black", s=12, zorder=3,
                        label="one run" if i == 0 else None)
        axes[2].text(i + 0.42, v, f"{v:.1f}", ha="right", va="bottom")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

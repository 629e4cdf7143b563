"""The long-answer benchmark's statistics, tables and plot: mean and 95% CI over seeds, a paired comparison."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.mopd_vs_baselines.report import STUDENT, TEACHER, normalized_score

__all__ = ["STUDENT", "TEACHER", "kl_table", "mean_ci", "normalized_score", "paired", "plot_curves", "results_table"]

# two-sided 97.5% quantiles of Student's t by degrees of freedom (n - 1); 1.96 beyond the table
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t confidence interval); the half-width is 0 for one value (no spread known)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """a - b seed by seed: mean difference, its 95% CI half-width, t statistic; 'ahead' when the CI excludes 0
    (never from one seed: its half-width of 0 says no spread is known, not that there is none)."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, half = mean_ci(diffs)
    sd = half / _T975.get(len(diffs) - 1, 1.96) * math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    t = mean / (sd / math.sqrt(len(diffs))) if sd > 0 else math.inf * (1 if mean > 0 else -1 if mean < 0 else 0)
    return {"mean_diff": mean, "ci95": half, "t": t, "n": len(diffs), "ahead": len(diffs) > 1 and mean - half > 0}


def _cell(values: list[float]) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {half:.3f}"


def results_table(per_seed: dict[str, list[dict[str, dict[str, float]]]], domains: list[str], kind: str,
                  student: dict[str, float], teacher: dict[str, float]) -> str:
    """One row per method: per-domain accuracy and normalized score, mean ± 95% CI over its seeds.

    `per_seed[name]` is one {domain: {"greedy", "sampled"}} per seed; `kind` picks greedy or sampled;
    the normalized score of each seed is taken against `student` and `teacher` (same kind).
    """
    lines = ["| Method | seeds | " + " | ".join(domains) + " | Normalized score |",
             "|---|---:|" + "---:|" * len(domains) + "---:|"]
    for name, runs in per_seed.items():
        accs = [{d: r[d][kind] for d in domains} for r in runs]
        scores = [normalized_score(a, student, teacher) for a in accs]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(_cell([a[d] for a in accs]) for d in domains)
                     + f" | {_cell(scores)} |")
    return "\n".join(lines) + "\n"


def kl_table(per_seed: dict[str, list[dict[str, dict[str, float]]]], domains: list[str]) -> str:
    """One row per method with a `reverse_kl` per domain: mean ± 95% CI over its seeds, and the mean of domains."""
    lines = ["| Method | seeds | " + " | ".join(domains) + " | mean |", "|---|---:|" + "---:|" * (len(domains) + 1)]
    for name, runs in per_seed.items():
        if not all("reverse_kl" in r[d] for r in runs for d in domains):
            continue
        kls = [[r[d]["reverse_kl"] for r in runs] for d in domains]
        means = [sum(r[d]["reverse_kl"] for d in domains) / len(domains) for r in runs]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(_cell(k) for k in kls) + f" | {_cell(means)} |")
    return "\n".join(lines) + "\n"

def plot_curves(curves: dict[str, list[list[tuple[float, float, float]]]], flat: dict[str, float],
                out: Path, kind: str = "greedy") -> Path:
    """Validation accuracy (mean over domains, mean over seeds) against sampled tokens and against training seconds.

    `curves[method]` is one [(sampled tokens, train seconds, accuracy)] per seed; `flat` are models without
    training (student, teachers, merges), drawn as horizontal lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    # 20 distinct colours: tab20's dark shades first, then its light ones (the default cycle repeats after 10)
    palette = [plt.get_cmap("tab20").colors[(2 * i) % 20 + (2 * i) // 20] for i in range(20)]
    for i, (name, seeds) in enumerate(curves.items()):
        n = min(len(s) for s in seeds)
        for ax, x in zip(axes, (0, 1)):
            xs = [sum(s[j][x] for s in seeds) / len(seeds) for j in range(n)]
            ys = [sum(s[j][2] for s in seeds) / len(seeds) for j in range(n)]
            ax.plot(xs, ys, marker="o", ms=3, color=palette[i % 20], label=name if x == 0 else None)
    for j, (name, acc) in enumerate(flat.items()):
        for ax in axes:
            ax.axhline(acc, color=("gray", "black")[j] if j < 2 else plt.get_cmap("Dark2").colors[(j - 2) % 8],
                       linestyle=":" if j == 0 else "--" if j == 1 else "-.", linewidth=1.1,
                       label=name if ax is axes[0] else None)
    axes[0].set_xlabel("sampled training tokens")
    axes[1].set_xlabel("training wall-clock seconds (2 shared CPU cores; evaluation excluded)")
    axes[0].set_ylabel(f"validation {kind} accuracy\n(mean of domains, seeds)")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

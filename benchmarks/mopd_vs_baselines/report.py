"""The benchmark's outputs: the markdown table (normalized score) and the accuracy-vs-tokens plot."""

from __future__ import annotations

from pathlib import Path

STUDENT = "Student (before)"
TEACHER = "Teacher (own domain)"


def normalized_score(acc: dict[str, float], student: dict[str, float], teacher: dict[str, float]) -> float:
    """Mean over domains of (acc - student) / (teacher - student): 0 = the student before, 1 = the teachers.

    A domain where the teacher is no better than the student has no gap to close and is left out.
    """
    parts = [(acc[d] - student[d]) / (teacher[d] - student[d]) for d in teacher if teacher[d] > student[d]]
    return sum(parts) / len(parts) if parts else float("nan")


def results_table(final: dict[str, dict[str, dict[str, float]]], domains: list[str], student: str,
                  teacher: str) -> str:
    """Greedy accuracy per domain and the normalized score (greedy), one row per method; then sampled accuracy.

    `final[name][domain]` holds "greedy" and "sampled"; `student` and `teacher` name the reference rows.
    """
    greedy = {name: {d: final[name][d]["greedy"] for d in domains} for name in final}
    lines = ["| Method | " + " | ".join(domains) + " | Normalized score |",
             "|---|" + "---:|" * len(domains) + "---:|"]
    for name, acc in greedy.items():
        score = normalized_score(acc, greedy[student], greedy[teacher])
        lines.append(f"| {name} | " + " | ".join(f"{acc[d]:.3f}" for d in domains) + f" | {score:.3f} |")
    lines += ["", "Sampled accuracy (temperature 1):", "",
              "| Method | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for name in final:
        lines.append(f"| {name} | " + " | ".join(f"{final[name][d]['sampled']:.3f}" for d in domains) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[tuple[int, dict[str, float]]]], flat: dict[str, dict[str, float]],
                domains: list[str], out: Path) -> Path:
    """Greedy held-out accuracy against sampled training tokens, one panel per domain.

    `curves[method]` is [(tokens, {domain: acc})]; `flat[name]` are models without training tokens
    (student, teachers, merges), drawn as horizontal lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4), sharey=True, squeeze=False)
    styles = {STUDENT: ("gray", ":"), TEACHER: ("black", "--")}
    for ax, domain in zip(axes[0], domains):
        for name, points in curves.items():
            ax.plot([t for t, _ in points], [acc[domain] for _, acc in points], marker="o", ms=3, label=name)
        for i, (name, acc) in enumerate(flat.items()):
            color, style = styles.get(name, (f"C{len(curves) + i}", "-."))
            ax.axhline(acc[domain], color=color, linestyle=style, linewidth=1.2, label=name)
        ax.set_title(domain)
        ax.set_xlabel("sampled training tokens")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out greedy accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

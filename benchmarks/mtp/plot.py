"""Plot benchmarks/mtp/results.json (and rl_acceptance.json when present) to benchmarks/mtp/plot.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent


def main(out: str = str(HERE / "plot.png")) -> None:
    table = json.loads((HERE / "results.json").read_text())["table"]
    rl_file = HERE / "rl_acceptance.json"
    rl = json.loads(rl_file.read_text()) if rl_file.exists() else None
    fig, axes = plt.subplots(1, 3 if rl else 2, figsize=(15 if rl else 10, 4))
    for temp, marker in (("T=0", "o"), ("T=1", "s")):
        for bs, style in (("bs=1", "-"), ("bs=8", "--")):
            rows = [r for r in table if r["setting"].startswith(f"{temp} {bs} ")]
            ks = [int(r["setting"].split("K=")[1]) for r in rows]
            line, = axes[0].plot(ks, [r["speedup"] for r in rows], style, marker=marker, label=f"{temp} {bs}")
            axes[0].plot(ks, [r["speedup_median_of_rounds"] for r in rows], ":", color=line.get_color(), lw=0.8)
            axes[1].plot(ks[1:], [r["tokens_per_verify"] for r in rows[1:]], style, marker=marker,
                         label=f"{temp} {bs}")
    axes[0].axhline(1.5, color="grey", lw=0.8)
    axes[0].set(xlabel="MTP draft tokens K", ylabel="tokens/s vs K=0 (dotted: median of rounds)",
                title="speed-up")
    axes[1].axhline(2.5, color="grey", lw=0.8)
    axes[1].set(xlabel="MTP draft tokens K", ylabel="tokens per verify forward (prefill token excluded)",
                title="acceptance length")
    for ax in axes[:2]:
        ax.set_xticks([0, 1, 2, 3])
        ax.legend()
    if rl:
        for name, run in rl["runs"].items():
            pts = sorted((int(k), v) for k, v in run["acceptance_by_step"].items())
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], "--" if "old heads" in name else "-", marker="o",
                         label=name)
        axes[2].set(xlabel="RL step", ylabel="acceptance length (K=3, T=1)", title="draft vs moving policy")
        axes[2].legend(fontsize=7, loc="upper left", ncol=1, framealpha=0.6)
        axes[2].set_ylim(top=axes[2].get_ylim()[1] + 0.6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""benchmarks/mopd_vs_baselines: the score arithmetic, and a shortened run of the real pipeline (--quick)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "mopd_vs_baselines"
sys.path.insert(0, str(BENCH))

from report import STUDENT, TEACHER, normalized_score, results_table  # noqa: E402


def test_normalized_score_is_zero_at_the_student_one_at_the_teacher_and_skips_no_gap_domains():
    student = {"a": 0.2, "b": 0.0, "c": 0.5}
    teacher = {"a": 1.0, "b": 0.8, "c": 0.5}  # c: no gap, left out
    assert normalized_score(student, student, teacher) == 0.0
    assert normalized_score(teacher, student, teacher) == 1.0
    assert normalized_score({"a": 0.6, "b": 0.8, "c": 0.0}, student, teacher) == pytest.approx((0.5 + 1.0) / 2)


def test_table_has_a_row_per_method_with_the_score_last():
    acc = {"a": {"greedy": 0.5, "sampled": 0.4}}
    final = {STUDENT: {"a": {"greedy": 0.0, "sampled": 0.0}}, TEACHER: {"a": {"greedy": 1.0, "sampled": 0.9}},
             "MOPD": acc}
    lines = results_table(final, ["a"], STUDENT, TEACHER).splitlines()
    assert lines[0] == "| Method | a | Normalized score |"
    assert lines[4] == "| MOPD | 0.500 | 0.500 |"


def _rows(table: str) -> list[list[str]]:
    """Cells of the first markdown table in `table` (header and separator dropped)."""
    rows = []
    for line in table.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[2:]


@pytest.mark.slow
def test_quick_benchmark_writes_a_wellformed_table_plot_and_curves(tmp_path: Path):
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out),
                           "--methods", "mopd,offpolicy_sft"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    result = json.loads((out / "results.json").read_text())
    domains = result["world"]["domains"]
    rows = _rows((out / "results.md").read_text().split("\n\n", 1)[1])
    names = [r[0] for r in rows]
    assert names == [STUDENT, TEACHER, "MOPD", "Off-policy finetune (SFT on teacher samples)",
                     "Merge: weight average", "Merge: task arithmetic"]
    for row in rows:
        assert len(row) == len(domains) + 2
        accs = [float(c) for c in row[1:-1]]
        assert all(0.0 <= a <= 1.0 for a in accs), row
        float(row[-1])  # the normalized score is a number (nan only if no teacher beats the student)
    assert rows[0][-1] == "0.000" and rows[1][-1] == "1.000"
    for name in ("MOPD", "Off-policy finetune (SFT on teacher samples)"):
        curve = result["curves"][name]
        tokens = [t for t, _ in curve]
        assert len(curve) >= 3 and tokens[0] == 0 and tokens == sorted(tokens)
        assert tokens[-1] >= result["budget_tokens"], "the run stopped before its sampled-token budget"
        assert set(curve[-1][1]) == set(domains)
    png = (out / "accuracy_vs_tokens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

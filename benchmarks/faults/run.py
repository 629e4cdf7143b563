"""Run the fault-injection cases (tests/faults) and print what happened and what each fault cost.

    python benchmarks/faults/run.py            # ~3-4 min on a 2-core CPU machine
    python benchmarks/faults/run.py --json out.json

Each case kills one part of a running job mid-step on the real stack (embedded Ray, local engines, a
Megatron rank on CPU, local sandboxes); the test asserts the outcome (step finished or a clear error plus
an exact resume, nothing lost or duplicated, restarted engines on the latest weights) and records the
step's wall time against the same step without the fault. This script runs those tests and tables them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cases(report: Path, pytest_args: list[str]) -> int:
    env = dict(os.environ, MOPD_FAULT_REPORT=str(report), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults", *pytest_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def table(rows: list[dict]) -> str:
    lines = ["| case | what happened | without fault (s) | with fault (s) | seconds lost |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['outcome']} | {r['baseline_s']:.1f} | {r['baseline_s'] + r['seconds_lost']:.1f}"
                     f" | {r['seconds_lost']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the rows here")
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.json"
        code = run_cases(report, pytest_args)
        rows = json.loads(report.read_text()) if report.exists() else []
    print(f"\nfault injection, {datetime.date.today()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}\n")
    print(table(rows))
    for r in rows:
        if r.get("note"):
            print(f"- {r['case']}: {r['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    sys.exit(code)


if __name__ == "__main__":
    main()

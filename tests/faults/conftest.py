"""Fault injection on the real stack: composed jobs, process lookup, and the table benchmarks/faults prints."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def fault_report() -> Iterator[list[dict[str, Any]]]:
    """Each case appends {case, outcome, seconds_lost, ...}; MOPD_FAULT_REPORT=path writes them as JSON."""
    rows: list[dict[str, Any]] = []
    yield rows
    target = os.environ.get("MOPD_FAULT_REPORT")
    if target:
        Path(target).write_text(json.dumps(rows, indent=2))


def descendant_pids(pattern: str, root: int | None = None) -> list[int]:
    """Processes below `root` (default: this one) whose command line contains `pattern`.

    Only this test's own process tree is searched, so a test never kills another run's processes.
    """
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
    root = os.getpid() if root is None else root
    found, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found.add(child)
                frontier.append(child)
    return sorted(p for p in found if pattern in cmdlines.get(p, ""))

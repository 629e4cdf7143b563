"""benchmarks/toolbox: the first-observation run on the real path (embedded Ray, Toolbox, local
sandboxes) counts what it claims to count: cold sessions start their sandbox on demand, warm and
preloaded ones take a pre-warmed one. No timing is asserted (benchmarks measure, tests check)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "toolbox" / "run.py"


def _run_module():
    spec = importlib.util.spec_from_file_location("toolbox_bench_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_observation_counts_cold_starts_and_warm_hits():
    bench = _run_module()
    res = bench.first_observation_trees(sessions=2, today_rev="")
    assert list(res) == ["this tree"]
    starts = res["this tree"]
    assert list(starts) == ["cold", "warm", "preloaded"]
    assert (starts["cold"]["cold_starts"], starts["cold"]["warm_hits"]) == (2, 0)
    for start in ("warm", "preloaded"):
        assert (starts[start]["cold_starts"], starts[start]["warm_hits"]) == (0, 2), start
    for r in starts.values():
        assert r["n"] == 2
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("open_p50", "first_call_p50"))
        assert r["open_p50"] < r["first_call_p50"] <= r["first_call_p99"]
    noop = {"p50_s": 0.01, "p99_s": 0.02, "n": 1}
    text = bench.table(
        {"noop_overhead": {"sandbox agent (HTTP, no Ray)": noop}, "first_observation": res, "throughput": {}}
    )
    assert "| preloaded |" in text and "| this tree: start |" in text

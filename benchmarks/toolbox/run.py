"""Toolbox benchmark: first-tool-call latency from a warm pool vs a cold start, throughput as the
worker pool grows, and the local sandbox side by side with its per-call-process path and with the
code of an older commit. One run, one table; nothing here is asserted (see README.md for results).

    python benchmarks/toolbox/run.py --sessions 16 --pools 1,2,4 --calls 6 --baseline-rev 988a8fe^
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time

import ray

from envs.sandbox.isolation import detect
from envs.swe.task import builtin_tasks
from envs.tool_parsing import ToolCall
from toolbox.manager import ToolManager, percentile
from toolbox.toolbox import get_or_create_toolbox

CALL = ToolCall("bash", {"command": "grep -c tomat inflection/__init__.py"})
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SANDBOX_KEYS = ("noop", "tool", "cold", "warm", "warm_preloaded")


def _checkout(rev: str, into: str) -> str:
    """The repository as of `rev` (git archive; mopd insists on its sibling packages), for --tree."""
    data = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def sandbox_variants(rounds: int, baseline_rev: str, calls: int, sessions: int) -> dict[str, dict]:
    """sandbox_latency.py per variant, the variants interleaved round by round (same load for all)."""
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"fork server (this tree)": ["--exec-mode", "forkserver"]}
        variants["process per call (this tree)"] = ["--exec-mode", "process"]
        if baseline_rev:
            variants[f"before ({baseline_rev})"] = ["--tree", _checkout(baseline_rev, tmp)]
        samples: dict[str, dict[str, list[float]]] = {v: {k: [] for k in SANDBOX_KEYS} for v in variants}
        for _ in range(rounds):
            for name, extra in variants.items():
                cmd = [sys.executable, os.path.join(HERE, "sandbox_latency.py"), *extra]
                cmd += ["--calls", str(calls), "--sessions", str(sessions)]
                got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                for k in SANDBOX_KEYS:
                    samples[name][k] += got[k]
    return {
        name: {f"{k}_p{q}": percentile(v[k], q) for k in SANDBOX_KEYS for q in (50, 99)}
        | {"n": len(v["noop"])}
        for name, v in samples.items()
    }


def _toolbox(name: str, workers: int, warm: int):
    tb = get_or_create_toolbox({"swe": {"workers": workers, "warm_per_worker": warm}}, name=name)
    ray.get(tb.prewarm.remote())
    return tb


async def first_call_latency(name: str, sessions: int, warm: bool) -> dict[str, float]:
    """Open a session and make its first tool call; warm: the pool holds a ready sandbox per session."""
    tb = _toolbox(name, workers=1, warm=sessions if warm else 0)
    tm = ToolManager(tb)
    task = builtin_tasks()[0]
    lat, call_lat = [], []
    for _ in range(sessions):  # sequential: latency, not contention
        t0 = time.perf_counter()
        sid, _ = await tm.start("swe", task)
        t1 = time.perf_counter()
        await tm.step(sid, CALL)
        lat.append(time.perf_counter() - t0)
        call_lat.append(time.perf_counter() - t1)
        await tm.close(sid)
    stats = await tb.stats.remote()
    ray.get(tb.shutdown.remote())
    ray.kill(tb)
    w = stats["workers"]["swe"][0]
    return {
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "call_p50_s": percentile(call_lat, 50),
        "call_p99_s": percentile(call_lat, 99),
        "warm_hits": w["warm_hits"],
        "cold_starts": w["cold_starts"],
    }


async def throughput(name: str, workers: int, sessions: int, calls: int) -> dict[str, float]:
    tb = _toolbox(name, workers=workers, warm=max(1, sessions // workers))
    tm = ToolManager(tb)
    task = builtin_tasks()[0]
    sids = [sid for sid, _ in await asyncio.gather(*(tm.start("swe", task) for _ in range(sessions)))]
    t0 = time.perf_counter()

    async def run(sid: str) -> None:
        for _ in range(calls):
            await tm.step(sid, CALL)

    await asyncio.gather(*(run(s) for s in sids))
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*(tm.close(s) for s in sids))
    ray.get(tb.shutdown.remote())
    ray.kill(tb)
    lat = tm.latency["bash"]
    return {
        "calls_per_s": sessions * calls / elapsed,
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
    }


async def main(args: argparse.Namespace) -> dict:
    out: dict = {
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "isolation": detect().as_dict(),
        },
        "args": vars(args),
    }
    out["cold"] = await first_call_latency("bench-cold", args.sessions, warm=False)
    out["warm"] = await first_call_latency("bench-warm", args.sessions, warm=True)
    out["throughput"] = {}
    for n in [int(x) for x in args.pools.split(",")]:
        out["throughput"][n] = await throughput(f"bench-pool-{n}", n, args.concurrent, args.calls)
    out["sandbox"] = sandbox_variants(
        args.rounds, args.baseline_rev, args.sandbox_calls, args.sandbox_sessions
    )
    return out


def table(res: dict) -> str:
    lines = [
        "| start | first call incl. session open p50 / p99 (s) | tool call alone p50 / p99 (s) | warm hits / cold starts |",
        "|---|---|---|---|",
    ]
    for k in ("cold", "warm"):
        r = res[k]
        lines.append(
            f"| {k} | {r['p50_s']:.3f} / {r['p99_s']:.3f} | {r['call_p50_s']:.3f} / {r['call_p99_s']:.3f} "
            f"| {r['warm_hits']} / {r['cold_starts']} |"
        )
    lines += ["", "| workers | calls/s | call p50 / p99 (s) |", "|---|---|---|"]
    for n, r in res["throughput"].items():
        lines.append(f"| {n} | {r['calls_per_s']:.1f} | {r['p50_s']:.3f} / {r['p99_s']:.3f} |")
    lines += [
        "",
        "| local sandbox (ms, p50 / p99) | no-op call | tool call | first obs. cold | warm | warm, snapshot preloaded | cold / warm | cold / preloaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["sandbox"].items():
        cells = [f"{r[k + '_p50'] * 1e3:.1f} / {r[k + '_p99'] * 1e3:.1f}" for k in SANDBOX_KEYS]
        ratios = [f"{r['cold_p50'] / r[k + '_p50']:.1f}x" for k in ("warm", "warm_preloaded")]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=16, help="sessions for the cold/warm latency runs")
    p.add_argument("--pools", default="1,2,4", help="worker counts for the throughput runs")
    p.add_argument("--concurrent", type=int, default=8, help="concurrent sessions in throughput runs")
    p.add_argument("--calls", type=int, default=6, help="tool calls per session in throughput runs")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the sandbox variants")
    p.add_argument("--sandbox-calls", type=int, default=20, help="no-op and tool calls per sandbox round")
    p.add_argument("--sandbox-sessions", type=int, default=4, help="cold/warm sessions per sandbox round")
    p.add_argument(
        "--baseline-rev", default="988a8fe^", help="also measure the sandbox of this git revision ('': skip)"
    )
    p.add_argument("--out", default="", help="write the JSON result here")
    a = p.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace="mopd")
    try:
        result = asyncio.run(main(a))
    finally:
        ray.shutdown()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    print(table(result))

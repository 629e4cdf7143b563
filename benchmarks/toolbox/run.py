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
from envs.sandbox.local import LocalSandboxBackend
from envs.swe.task import builtin_tasks, task_to_dict
from envs.tool_parsing import ToolCall
from toolbox.manager import ToolManager, percentile
from toolbox.toolbox import get_or_create_toolbox

CALL = ToolCall("bash", {"command": "grep -c tomat inflection/__init__.py"})
NOOP = ToolCall("bash", {"command": "true"})
SETTLE_S = 0.3  # pause before each session of the first-call runs (the warm pool refills meanwhile)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STARTS = ("cold", "warm", "preloaded")
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


async def first_call_latency(sessions: int) -> dict[str, dict[str, float]]:
    """Open a session and make its first tool call, for each way a session can start, the starts
    taking turns session by session (so machine load falls on all of them alike).

    "cold": nothing warm; "warm": a ready sandbox per session with an empty workspace (the env
    uploads the task's files: the path before snapshot pre-warming); "preloaded": ready sandboxes
    that already hold the task's snapshot. Each start has its own one-worker Toolbox; before every
    session the pools settle (the warm pool refills) outside the timed part.
    """
    task = builtin_tasks()[0]
    boxes = {s: _toolbox(f"bench-{s}", workers=1, warm=sessions if s == "warm" else 0) for s in STARTS}
    await boxes["preloaded"].prewarm.remote("swe", sessions, task_to_dict(task))
    lat: dict[str, list[float]] = {s: [] for s in STARTS}
    call_lat: dict[str, list[float]] = {s: [] for s in STARTS}
    for _ in range(sessions):  # one session at a time: latency, not contention
        for start, tb in boxes.items():
            tm = ToolManager(tb)
            await asyncio.sleep(SETTLE_S)
            t0 = time.perf_counter()
            sid, _ = await tm.start("swe", task)
            t1 = time.perf_counter()
            await tm.step(sid, CALL)
            lat[start].append(time.perf_counter() - t0)
            call_lat[start].append(time.perf_counter() - t1)
            await tm.close(sid)
    out = {}
    for start, tb in boxes.items():
        w = (await tb.stats.remote())["workers"]["swe"][0]
        ray.get(tb.shutdown.remote())
        ray.kill(tb)
        out[start] = {
            "p50_s": percentile(lat[start], 50),
            "p99_s": percentile(lat[start], 99),
            "call_p50_s": percentile(call_lat[start], 50),
            "call_p99_s": percentile(call_lat[start], 99),
            "warm_hits": w["warm_hits"],
            "cold_starts": w["cold_starts"],
        }
    return out


async def call_overhead(name: str, calls: int) -> dict[str, dict[str, float]]:
    """A no-op tool call (``bash true``) at each layer of the path, in one run: the sandbox's agent
    over HTTP (no Ray), the worker actor (env step, one Ray hop), the Toolbox actor (admission and
    recovery, two hops) and the ToolManager (the whole path a rollout uses). The layers take turns
    call by call, so machine load falls on all of them alike."""
    tb = get_or_create_toolbox(
        {"swe": {"workers": 1, "warm_per_worker": 0, "max_turns": 4 * calls + 20}}, name=name
    )
    tm = ToolManager(tb)
    sid, _ = await tm.start("swe", builtin_tasks()[0])
    worker = await tb.session_worker.remote(sid)
    backend = LocalSandboxBackend()
    sb = await backend.create()
    wire = {"name": NOOP.name, "arguments": NOOP.arguments}
    layers = {
        "sandbox agent (HTTP, no Ray)": lambda: sb.exec("true"),
        "worker actor (1 Ray hop)": lambda: worker.step.remote(sid, wire),
        "Toolbox actor (2 Ray hops)": lambda: tb.step.remote(sid, wire),
        "ToolManager (whole path)": lambda: tm.step(sid, NOOP),
    }
    samples: dict[str, list[float]] = {k: [] for k in layers}
    for i in range(calls + 3):
        for layer, call in layers.items():
            t0 = time.perf_counter()
            await call()
            if i >= 3:  # the first calls warm connections and the fork server up
                samples[layer].append(time.perf_counter() - t0)
    await sb.close()
    await tm.close(sid)
    ray.get(tb.shutdown.remote())
    ray.kill(tb)
    return {
        k: {"p50_s": percentile(v, 50), "p99_s": percentile(v, 99), "n": len(v)} for k, v in samples.items()
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
    out["noop_overhead"] = await call_overhead("bench-noop", args.noop_calls)
    out.update(await first_call_latency(args.sessions))
    out["throughput"] = {}
    for n in [int(x) for x in args.pools.split(",")]:
        out["throughput"][n] = await throughput(f"bench-pool-{n}", n, args.concurrent, args.calls)
    if args.rounds:
        out["sandbox"] = sandbox_variants(
            args.rounds, args.baseline_rev, args.sandbox_calls, args.sandbox_sessions
        )
    return out


def table(res: dict) -> str:
    base = res["noop_overhead"]["sandbox agent (HTTP, no Ray)"]["p50_s"]
    lines = [
        "| no-op call (`bash true`) at | p50 / p99 (ms) | above the sandbox agent, p50 (ms) |",
        "|---|---|---|",
    ]
    for layer, r in res["noop_overhead"].items():
        lines.append(
            f"| {layer} | {r['p50_s'] * 1e3:.1f} / {r['p99_s'] * 1e3:.1f} | {(r['p50_s'] - base) * 1e3:+.1f} |"
        )
    lines += [
        "",
        "| start | first call incl. session open p50 / p99 (s) | tool call alone p50 / p99 (s) | warm hits / cold starts | cold / this, p50 |",
        "|---|---|---|---|---|",
    ]
    for k in STARTS:
        r = res[k]
        lines.append(
            f"| {k} | {r['p50_s']:.3f} / {r['p99_s']:.3f} | {r['call_p50_s']:.3f} / {r['call_p99_s']:.3f} "
            f"| {r['warm_hits']} / {r['cold_starts']} | {res['cold']['p50_s'] / r['p50_s']:.1f}x |"
        )
    lines += ["", "| workers | calls/s | call p50 / p99 (s) |", "|---|---|---|"]
    for n, r in res["throughput"].items():
        lines.append(f"| {n} | {r['calls_per_s']:.1f} | {r['p50_s']:.3f} / {r['p99_s']:.3f} |")
    if "sandbox" not in res:
        return "\n".join(lines)
    lines += [
        "",
        "| local sandbox (ms, p50 / p99) | no-op call | tool call | first obs. cold | warm | warm, snapshot preloaded | cold / warm | cold / preloaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.get("sandbox", {}).items():
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
    p.add_argument("--noop-calls", type=int, default=60, help="no-op calls per layer of the path")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the sandbox variants (0: skip them)"
    )
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

"""Toolbox benchmark: a no-op call at each layer of the tool path, a session's first observation
pre-warmed vs cold (this tree side by side with the tree before, ``first_observation.py``),
throughput as the worker pool grows, and the local sandbox side by side with its per-call-process
path and with the code of an older commit. One run, one table; nothing here is asserted (see
README.md for results).

    python benchmarks/toolbox/run.py --sessions 8 --pools 1,2,4 --calls 6 --today-rev 53c611a
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
from envs.swe.task import builtin_tasks
from envs.tool_parsing import ToolCall
from toolbox.manager import ToolManager, percentile
from toolbox.toolbox import get_or_create_toolbox

CALL = ToolCall("bash", {"command": "grep -c tomat inflection/__init__.py"})
NOOP = ToolCall("bash", {"command": "true"})
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


def _reply(proc: subprocess.Popen) -> str:
    """The next protocol line of a first_observation.py child (anything else it prints is skipped)."""
    while line := proc.stdout.readline():
        if line.startswith(("READY", "{")):
            return line
    raise RuntimeError(f"first_observation.py exited with {proc.wait()}")


def first_observation_trees(sessions: int, today_rev: str) -> dict[str, dict]:
    """first_observation.py for this tree and for the tree at ``today_rev`` (the path before this
    change), both running, taking turns session by session; per tree and start: p50/p99 of the
    session open and of open + first tool call, warm hits and cold starts."""
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": []}
        if today_rev:
            trees = {f"before ({today_rev})": ["--tree", _checkout(today_rev, tmp)], **trees}
        procs = {
            name: subprocess.Popen(
                [sys.executable, os.path.join(HERE, "first_observation.py"), *extra],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for name, extra in trees.items()
        }
        try:
            for proc in procs.values():
                _reply(proc)  # READY
            samples = {name: {} for name in procs}
            for _ in range(sessions):
                for name, proc in procs.items():
                    proc.stdin.write("session\n")
                    proc.stdin.flush()
                    for start, values in json.loads(_reply(proc)).items():
                        for k, v in values.items():
                            samples[name].setdefault(start, {}).setdefault(k, []).append(v)
            counts = {}
            for name, proc in procs.items():
                proc.stdin.write("stop\n")
                proc.stdin.flush()
                counts[name] = json.loads(_reply(proc))
                proc.wait(timeout=120)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return {
        name: {
            start: {f"{k}_p{q}": percentile(v[k], q) for k in ("open", "first_call") for q in (50, 99)}
            | counts[name][start]
            | {"n": len(v["open"])}
            for start, v in per_start.items()
        }
        for name, per_start in samples.items()
    }


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
    for tree, starts in res.get("first_observation", {}).items():
        lines += [
            "",
            (
                f"| {tree}: start | session open p50 / p99 (ms) | open + first tool call p50 / p99 (ms) "
                "| warm hits / cold starts | cold / this, open | cold / this, open + call |"
            ),
            "|---|---|---|---|---|---|",
        ]
        cold = starts["cold"]
        for start, r in starts.items():
            lines.append(
                f"| {start} | {r['open_p50'] * 1e3:.1f} / {r['open_p99'] * 1e3:.1f} "
                f"| {r['first_call_p50'] * 1e3:.1f} / {r['first_call_p99'] * 1e3:.1f} "
                f"| {r['warm_hits']} / {r['cold_starts']} | {cold['open_p50'] / r['open_p50']:.1f}x "
                f"| {cold['first_call_p50'] / r['first_call_p50']:.1f}x |"
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
    p.add_argument(
        "--sessions", type=int, default=24, help="first observations per start and tree (0: skip them)"
    )
    p.add_argument(
        "--today-rev", default="53c611a", help="first observations also on this git revision ('': skip)"
    )
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
    first = (  # first: each run starts its own Ray cluster, none of this process's may idle beside it
        first_observation_trees(a.sessions, a.today_rev) if a.sessions else None
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace="mopd")
    try:
        result = asyncio.run(main(a))
    finally:
        ray.shutdown()
    if first is not None:
        result["first_observation"] = first
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    print(table(result))

"""A session's first observation through the whole tool path (ToolManager -> Toolbox actor -> worker
actor -> local sandbox), cold vs pre-warmed, on its own embedded Ray cluster.

Driven over stdin/stdout by ``run.py``, which runs one of these per tree and lets the trees take
turns session by session (same machine load for both): after start-up it prints ``READY``; each
``session`` line runs one session per start and prints their samples (seconds) as one JSON line;
``stop`` prints the workers' warm hits and cold starts and exits.

``--tree DIR`` imports the project from DIR (a ``git archive`` of another revision), so today's path
and an older one are measured by the same script on the same machine in the same run.

    python benchmarks/toolbox/first_observation.py [--tree DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

STARTS = ("cold", "warm", "preloaded")
SETTLE_S = 0.3  # pause before each session (outside the timing): the warm pool refills meanwhile
GREP = "grep -c tomat inflection/__init__.py"  # the tool call of sandbox_latency.py
BATCH = 4  # preloaded sandboxes made at a time, outside the timing, as mopd/agentic.py does per step


async def _command() -> str:
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


async def serve() -> None:
    """Per ``session``: each start opens a session (``reset``'s first observation) and makes its
    first tool call. "cold": opened on demand, nothing pre-warmed (the sandbox starts inside
    ``open``); "warm": a ready sandbox with an empty workspace (the env uploads the task's files);
    "preloaded": a ready sandbox holding the task's snapshot, made by ``ToolManager.prewarm`` with the
    task before the sessions start (how mopd/agentic.py pre-warms a step's episodes). Each start has
    its own one-worker Toolbox."""
    import ray

    from envs.swe.task import builtin_tasks
    from envs.tool_parsing import ToolCall
    from toolbox.manager import ToolManager
    from toolbox.toolbox import get_or_create_toolbox

    task, call = builtin_tasks()[0], ToolCall("bash", {"command": GREP})
    managers = {}
    for start in STARTS:
        pool = {"workers": 1, "warm_per_worker": 2 if start == "warm" else 0}
        tb = get_or_create_toolbox({"swe": pool}, name=f"fo-{start}-{os.getpid()}")
        await tb.prewarm.remote()
        managers[start] = ToolManager(tb)
    preloaded = 0
    print("READY", flush=True)
    while (line := await _command()) == "session":
        if preloaded == 0:
            await managers["preloaded"].prewarm("swe", BATCH, task)
            preloaded = BATCH
        preloaded -= 1
        out = {}
        for start, tm in managers.items():
            await asyncio.sleep(SETTLE_S)
            t0 = time.perf_counter()
            sid, _ = await tm.start("swe", task)
            t1 = time.perf_counter()
            result = await tm.step(sid, call)
            t2 = time.perf_counter()
            if not result.observation.startswith("1\n"):
                raise RuntimeError(f"{start}: unexpected tool observation {result.observation!r}")
            out[start] = {"open": t1 - t0, "first_call": t2 - t0}
            await tm.close(sid)
        print(json.dumps(out), flush=True)
    if line != "stop":
        raise ValueError(f"expected `session` or `stop`, got {line!r}")
    stats = {}
    for start, tm in managers.items():
        worker = (await tm.toolbox.stats.remote())["workers"]["swe"][0]
        stats[start] = {"warm_hits": worker["warm_hits"], "cold_starts": worker["cold_starts"]}
        await tm.toolbox.shutdown.remote()
        ray.kill(tm.toolbox)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tree", default="", help="import the project from this directory (default: this checkout)"
    )
    args = p.parse_args()
    if args.tree:
        sys.path.insert(0, os.path.abspath(args.tree))  # Ray's workers get the driver's sys.path
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="mopd")
    try:
        asyncio.run(serve())
    finally:
        ray.shutdown()

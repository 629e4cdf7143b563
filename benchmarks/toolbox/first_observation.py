"""A session's first observation through the whole tool path (ToolManager -> Toolbox actor -> worker
actor -> local sandbox), cold vs pre-warmed, on its own embedded Ray cluster. Prints one JSON object
of samples (seconds); ``run.py`` runs it once per tree and round, the trees taking turns.

``--tree DIR`` imports the project from DIR (a ``git archive`` of another revision), so today's path
and an older one are measured by the same script on the same machine in the same run.

    python benchmarks/toolbox/first_observation.py [--tree DIR] [--sessions 8]
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


async def measure(sessions: int) -> dict[str, dict[str, list[float]]]:
    """Per start, the session open (``reset``'s first observation) and open + first tool call.

    "cold": a session opened on demand, nothing pre-warmed (the sandbox starts inside ``open``);
    "warm": a ready sandbox with an empty workspace per session (the env uploads the task's files);
    "preloaded": ready sandboxes that hold the task's snapshot, made by ``ToolManager.prewarm`` with
    the task before the sessions start (how mopd/agentic.py pre-warms a step's episodes). Each start
    has its own one-worker Toolbox; the starts take turns session by session (same load for all).
    """
    import ray

    from envs.swe.task import builtin_tasks
    from envs.tool_parsing import ToolCall
    from toolbox.manager import ToolManager
    from toolbox.toolbox import get_or_create_toolbox

    task, call = builtin_tasks()[0], ToolCall("bash", {"command": GREP})
    managers = {}
    for start in STARTS:
        warm = sessions if start == "warm" else 0
        tb = get_or_create_toolbox({"swe": {"workers": 1, "warm_per_worker": warm}}, name=f"fo-{start}")
        await tb.prewarm.remote()
        managers[start] = ToolManager(tb)
    await managers["preloaded"].prewarm("swe", sessions, task)
    out: dict[str, dict[str, list[float]]] = {s: {"open": [], "first_call": []} for s in STARTS}
    for _ in range(sessions):
        for start, tm in managers.items():
            await asyncio.sleep(SETTLE_S)
            t0 = time.perf_counter()
            sid, _ = await tm.start("swe", task)
            t1 = time.perf_counter()
            result = await tm.step(sid, call)
            t2 = time.perf_counter()
            if not result.observation.startswith("1\n"):
                raise RuntimeError(f"{start}: unexpected tool observation {result.observation!r}")
            out[start]["open"].append(t1 - t0)
            out[start]["first_call"].append(t2 - t0)
            await tm.close(sid)
    for start, tm in managers.items():
        stats = (await tm.toolbox.stats.remote())["workers"]["swe"][0]
        out[start]["hits"] = [stats["warm_hits"]]
        out[start]["cold_starts"] = [stats["cold_starts"]]
        await tm.toolbox.shutdown.remote()
        ray.kill(tm.toolbox)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tree", default="", help="import the project from this directory (default: this checkout)"
    )
    p.add_argument("--sessions", type=int, default=8, help="sessions per start")
    args = p.parse_args()
    if args.tree:
        sys.path.insert(0, os.path.abspath(args.tree))  # Ray's workers get the driver's sys.path
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="mopd")
    try:
        result = asyncio.run(measure(args.sessions))
    finally:
        ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
